// simd_f32_kernels.h: the float32 kernels of the SIMD modules, written once over an ISA traits struct. Each
// module (kernels_avx2.cc, kernels_avx512.cc) instantiates them with its own traits, so every copy is built with
// that module's instruction-set flags and, like everything here, has internal linkage (see simd_common.h).
//
// The traits struct Isa provides:
//   Vec, kLanes                     a float32 vector of kLanes lanes;
//   Zero, Load, Store, Set1, Add, Mul, And (bitwise), Fmadd(a, b, c) = a * b + c, Sum (horizontal);
//   kGroup = 2 * kLanes             codes decoded per step (kGroup / 2 bytes of B);
//   Table, LoadTable(), Decode(bytes, table, &even, &odd)
//                                   the NF4 values of the kLanes even k and the kLanes odd k of a group;
//   ScaleTable(table, s)            the table times the vector s (a block's exact weights, for Decode);
//   kMaxGemvRows                    rows of A per weight-streaming pass;
//   kGemvColumns                    columns per weight-streaming pass of a single row (their scaled tables and
//                                   accumulators fit the registers);
//   kOutlinedPanel                  whether the Y^T tiles call the panel decode out of line;
//   kGemmMr, kGemmNv, kGemmKc       GEMM register tile (kGemmMr rows x kGemmNv vectors of columns) and the K per
//                                   decoded panel;
//   kGemmTaskGroups                 most column groups per GEMM task.
// docs/cpu_kernel.md explains the algorithms.
#ifndef ONNX_NF4_SIMD_F32_KERNELS_H_
#define ONNX_NF4_SIMD_F32_KERNELS_H_

#include <immintrin.h>

#include <cstring>

#include "cpu_kernels.h"
#include "simd_common.h"

namespace onnx_nf4::cpu {
namespace {  // NOLINT(build/namespaces): see above

constexpr int64_t kGemvCols = 16;           // columns per weight-streaming task
constexpr int64_t kMinGemmRows = 16;        // float32: rows from which the Y^T tiles beat weight streaming
constexpr int64_t kMinPackedGemmRows = 48;  // float32: rows from which the packed GEMM beats the Y^T tiles
constexpr int64_t kTileKc = 64;             // K per Y^T tile panel (TN x 64 floats, + the 64 x M_tile of A^T: L1)

// ---------------------------------------------------------------- float32, small M (weight streaming)

struct GemvArgs {
  const Problem* p;
  const float* ap;  // [M][K_pad] in code order
  int64_t kpad;
  int64_t l1_bytes;  // L1DataCacheBytes()
  // Per lane of a block's reduced sum, whether it holds a real k of the last block (all bits set) or only padding
  // (zero): lane l sums k = (k_blocks - 1) * block_size + 2l + {0, 1} + multiples of kGroup, so it holds a real
  // k iff the first of them is < K.
  alignas(64) uint32_t last_block_lanes[16];
};

// MR rows of A against one column, U code groups per step (U independent accumulator pairs per row).
// Columns are walked one after the other, so the weight is read as one sequential stream (several
// interleaved column streams measured markedly slower from DRAM). The scale multiplies each block's sum; two
// running totals alternate between blocks to halve their dependency chain. Not inlined: a function of its own
// gets the registers to itself (inlined into the row dispatch, it measured slower).
template <class Isa, int MR, int U>
__attribute__((noinline)) void GemvColumn(const GemvArgs& g, int64_t m0, int64_t n, int64_t b_begin, int64_t b_end,
                                          bool prefetch_next) {
  using Vec = typename Isa::Vec;
  constexpr int64_t kGroup = Isa::kGroup;
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const typename Isa::Table table = Isa::LoadTable();
  if (b_begin == 0) PrefetchScales(w, n + kScaleLookahead);
  Vec tot0[MR], tot1[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = Isa::Zero();
  // One block: its sums, times its scale s, into tot (a lambda: the two totals stay in registers).
  auto block = [&](int64_t b, Vec(&tot)[MR], Vec s) {
    Vec acc[MR][2 * U];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 2 * U; ++u) acc[m][u] = Isa::Zero();
    // do-while with pointers: the compiler sees at least one trip and keeps acc in registers.
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const float* a = g.ap + m0 * g.kpad + b * bs;
    // When K is walked in pieces, the next column's piece is not where the hardware prefetchers look: request
    // it gradually, at the current offset of this piece (one piece ahead).
    if (prefetch_next) __builtin_prefetch(c + kb * bs / 2, 0, 3);
    do {
      for (int u = 0; u < U; ++u) {
        Vec we, wo;
        Isa::Decode(c + u * (kGroup / 2), table, &we, &wo);
        for (int m = 0; m < MR; ++m) {
          const float* am = a + m * g.kpad + u * kGroup;
          acc[m][2 * u] = Isa::Fmadd(we, Isa::Load(am), acc[m][2 * u]);
          acc[m][2 * u + 1] = Isa::Fmadd(wo, Isa::Load(am + Isa::kLanes), acc[m][2 * u + 1]);
        }
      }
      c += U * (kGroup / 2);
      a += U * kGroup;
    } while (c < c_end);
    for (int m = 0; m < MR; ++m) {
      for (int u = 2 * U; u > 1; u /= 2)
        for (int v = 0; v < u / 2; ++v) acc[m][v] = Isa::Add(acc[m][v], acc[m][v + u / 2]);
      tot[m] = Isa::Fmadd(acc[m][0], s, tot[m]);
    }
  };
  auto scale = [&](int64_t b) { return Isa::Set1(BlockScale(w, n, b)); };
  // A last block with padding goes last, on its own: its padding-only lanes (A's zero padding times table values)
  // get scale 0, so that an infinite scale never meets them (0 * Inf = NaN) and padding never reaches the result.
  const bool padded_last = b_end == kb && w.K < g.kpad;
  const int64_t b_full = padded_last ? b_end - 1 : b_end;
  if constexpr (MR <= 2) {  // few rows: alternate two totals to halve their dependency chains
    int64_t b = b_begin;
    for (; b + 1 < b_full; b += 2) {
      block(b, tot0, scale(b));
      block(b + 1, tot1, scale(b + 1));
    }
    if (b < b_full) block(b, tot0, scale(b));
  } else {  // MR independent chains already; a second set of totals would spill registers
    for (int64_t b = b_begin; b < b_full; ++b) block(b, tot0, scale(b));
  }
  if (padded_last) {
    block(kb - 1, tot1, Isa::And(scale(kb - 1), Isa::Load(reinterpret_cast<const float*>(g.last_block_lanes))));
  }
  for (int m = 0; m < MR; ++m) {
    float& y = p.Y[(m0 + m) * w.N + n];
    const float base = b_begin > 0 ? y : (p.bias != nullptr ? p.bias[n] : 0.0f);
    y = base + Isa::Sum(Isa::Add(tot0[m], tot1[m]));
  }
}

// Columns [n0, n1) for MR rows; one row gets up to 4 groups per step, two rows 2 (block size permitting).
// K is walked in chunks whose MR activation rows fit in L1, partial sums accumulating in Y.
template <class Isa, int MR>
void GemvRows(const GemvArgs& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t bs = g.p->w.block_size, kb = g.p->w.k_blocks, groups = bs / Isa::kGroup;
  const int64_t chunk = MaxI64(1, (g.l1_bytes / (MR * static_cast<int64_t>(sizeof(float)))) / bs);
  for (int64_t b0 = 0; b0 < kb; b0 += chunk) {
    const int64_t b1 = MinI64(kb, b0 + chunk);
    const bool pieces = chunk < kb;
    for (int64_t n = n0; n < n1; ++n) {
      const bool prefetch = pieces && n + 1 < n1;
      if (MR == 1 && groups % 4 == 0) {
        GemvColumn<Isa, MR, 4>(g, m0, n, b0, b1, prefetch);
      } else if (MR <= 2 && groups % 2 == 0) {
        GemvColumn<Isa, MR, 2>(g, m0, n, b0, b1, prefetch);
      } else {
        GemvColumn<Isa, MR, 1>(g, m0, n, b0, b1, prefetch);
      }
    }
  }
}

// One row m against NC consecutive columns [n, n + NC): the decode step of an LLM (M = 1), where K is small
// enough that fixed costs per column (a horizontal sum, the call) would weigh. Per block, each column's table is
// scaled by its block scale (Isa::ScaleTable), so the decode yields the exact weights fl32(NF4[q] * s) (rule 2 of
// the spec) and the products accumulate across blocks with no per-block reduction; each group of A (its even and
// odd k) is loaded once for all NC columns, whose codes follow each other in memory (one sequential stream). Needs
// the whole row of A in one L1 chunk (no partial sums in Y). In the last block, k >= K get weight 0 (a group wholly
// past K is skipped, the straddling one masked), so that an infinite scale never meets A's zero padding.
template <class Isa, int NC>
__attribute__((noinline)) void GemvRowColumns(const GemvArgs& g, int64_t m, int64_t n) {
  using Vec = typename Isa::Vec;
  constexpr int64_t kGroup = Isa::kGroup, kL = Isa::kLanes;
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, col_bytes = kb * bs / 2;
  const uint8_t* codes = w.packed + n * col_bytes;
  const float* arow = g.ap + m * g.kpad;
  const typename Isa::Table table = Isa::LoadTable();
  for (int c = 0; c < NC; ++c) PrefetchScales(w, n + NC + c);
  Vec acc[NC][2];
  for (int c = 0; c < NC; ++c) acc[c][0] = acc[c][1] = Isa::Zero();
  // Block b, of which the first `real` k are below K.
  auto block = [&](int64_t b, int64_t real) {
    typename Isa::Table scaled[NC];
    for (int c = 0; c < NC; ++c) scaled[c] = Isa::ScaleTable(table, Isa::Set1(BlockScale(w, n + c, b)));
    const float* a = arow + b * bs;
    const uint8_t* cb = codes + b * (bs / 2);
    const int64_t full = real / kGroup * kGroup;  // k of the groups wholly below K
    for (int64_t j = 0; j < full; j += kGroup) {
      const Vec ae = Isa::Load(a + j), ao = Isa::Load(a + j + kL);
      for (int c = 0; c < NC; ++c) {
        Vec we, wo;
        Isa::Decode(cb + c * col_bytes + j / 2, scaled[c], &we, &wo);
        acc[c][0] = Isa::Fmadd(we, ae, acc[c][0]);
        acc[c][1] = Isa::Fmadd(wo, ao, acc[c][1]);
      }
    }
    if (full < real) {  // the group across K: lane l holds k = full + 2l (even) and full + 2l + 1 (odd)
      alignas(64) uint32_t even_lanes[kL], odd_lanes[kL];
      for (int64_t l = 0; l < kL; ++l) {
        even_lanes[l] = full + 2 * l < real ? ~0u : 0u;
        odd_lanes[l] = full + 2 * l + 1 < real ? ~0u : 0u;
      }
      const Vec me = Isa::Load(reinterpret_cast<const float*>(even_lanes));
      const Vec mo = Isa::Load(reinterpret_cast<const float*>(odd_lanes));
      const Vec ae = Isa::Load(a + full), ao = Isa::Load(a + full + kL);
      for (int c = 0; c < NC; ++c) {
        Vec we, wo;
        Isa::Decode(cb + c * col_bytes + full / 2, scaled[c], &we, &wo);
        acc[c][0] = Isa::Fmadd(Isa::And(we, me), ae, acc[c][0]);
        acc[c][1] = Isa::Fmadd(Isa::And(wo, mo), ao, acc[c][1]);
      }
    }
  };
  for (int64_t b = 0; b + 1 < kb; ++b) block(b, bs);
  block(kb - 1, w.K - (kb - 1) * bs);
  for (int c = 0; c < NC; ++c) {
    const float base = p.bias != nullptr ? p.bias[n + c] : 0.0f;
    p.Y[m * w.N + n + c] = base + Isa::Sum(Isa::Add(acc[c][0], acc[c][1]));
  }
}

template <class Isa>
void GemvTask(void* data, size_t task) {
  const GemvArgs& g = *static_cast<const GemvArgs*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, g.p->w.N);
  // A single row whose K fits L1 in one piece (the chunk of GemvRows): NC columns at a time.
  if (g.p->M == 1 && g.kpad * static_cast<int64_t>(sizeof(float)) <= g.l1_bytes) {
    constexpr int NC = Isa::kGemvColumns;
    int64_t n = n0;
    for (; n + NC <= n1; n += NC) GemvRowColumns<Isa, NC>(g, 0, n);
    for (; n < n1; ++n) GemvRowColumns<Isa, 1>(g, 0, n);
    return;
  }
  ForRowGroups<Isa::kMaxGemvRows>(g.p->M,
                                  [&](auto rows, int64_t m0) { GemvRows<Isa, decltype(rows)::kValue>(g, m0, n0, n1); });
}

// Y = A @ W (+ bias) for few rows: A packed once in code order, then tasks of kGemvCols columns stream W.
template <class Isa>
void GemvF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kpad = w.k_blocks * w.block_size;
  auto* ap = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kpad)));
  for (int64_t m = 0; m < p.M; ++m) PackRowCodeOrder(p.A + m * w.K, w.K, Isa::kGroup, ap + m * kpad);
  GemvArgs g{&p, ap, kpad, L1DataCacheBytes(), {}};
  const int64_t last_real = w.K - (w.k_blocks - 1) * w.block_size;  // real k in the last block, >= 1
  for (int64_t l = 0; l < Isa::kLanes; ++l) g.last_block_lanes[l] = 2 * l < last_real ? ~0u : 0u;
  par.For(static_cast<size_t>(CeilDiv(w.N, kGemvCols)), p.M * w.N * w.K, GemvTask<Isa>, &g);
}

// ---------------------------------------------------------------- float32, medium M (Y^T tiles)
//
// For kMinGemmRows <= M < kMinPackedGemmRows, where the decode is a large part of the work and the column-wise
// decode below (no transpose) pays off. Computes Y^T tile by tile: a task owns TN columns; per chunk of K it decodes
// their exact weights W[k, n] = NF4 * scale into a TN x kc panel (L1), then every (kLanes * V)-row tile of A^T (packed
// once per call, in code order) accumulates TN x (kLanes * V) outputs in TN * V registers. Y^T lives in a per-call
// buffer and is transposed into Y (+ bias) by the task at the end.

struct TileArgs {
  const Problem* p;
  const float* at;  // [K_pad][M_pad] in code order along K
  float* yt;        // [N_pad][M_pad]
  int64_t kpad, mpad;
};

// Decodes the exact weights W[k0 + j, n0 + c] (j < kc, c < TN; zero for c >= nc or k0 + j >= K) into
// panel[c * kTileKc + j], in code order. The column stride is the constant kTileKc even for a shorter last
// chunk: the tile loop then addresses the TN weights of a k as one pointer plus constant offsets (with the
// stride kc, the TN offsets would need TN registers and spill).
template <class Isa, int TN>
__attribute__((always_inline)) inline void DecodePanel(const Nf4Weight& w, int64_t n0, int64_t nc, int64_t k0,
                                                       int64_t kc, int64_t kpad, float* panel) {
  using Vec = typename Isa::Vec;
  const int64_t bs = w.block_size, row_bytes = w.k_blocks * bs / 2;
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(bs));
  const typename Isa::Table table = Isa::LoadTable();
  for (int64_t c = 0; c < TN; ++c) {
    float* dst = panel + c * kTileKc;
    if (c >= nc) {
      std::memset(dst, 0, sizeof(float) * kc);
      continue;
    }
    const uint8_t* codes = w.packed + (n0 + c) * row_bytes;
    // The columns are TN interleaved streams, which the hardware prefetchers serve poorly: fetch the next
    // chunk's codes (kc / 2 bytes) now.
    if (k0 + kc < kpad) {
      for (int64_t off = 0; off < kc / 2; off += 64) __builtin_prefetch(codes + (k0 + kc) / 2 + off, 0, 3);
    }
    for (int64_t j = 0; j < kc;) {  // block by block (block_size and kc are powers of two)
      const int64_t b = (k0 + j) >> bs_log2;
      // The block's 16 exact weights NF4[code] * scale, once: the lookup then yields them directly.
      const typename Isa::Table scaled = Isa::ScaleTable(table, Isa::Set1(BlockScale(w, n0 + c, b)));
      const int64_t j_end = MinI64(kc, (b + 1) * bs - k0);
      for (; j < j_end; j += Isa::kGroup) {
        Vec we, wo;
        Isa::Decode(codes + (k0 + j) / 2, scaled, &we, &wo);
        Isa::Store(dst + j, we);
        Isa::Store(dst + j + Isa::kLanes, wo);
      }
    }
    // The padding k >= K decode to NF4[q] * scale, which may be infinite: zero them, so that they never reach the
    // products (the padded rows of A^T are zero, and 0 * Inf would be NaN).
    for (int64_t k = MaxI64(k0, w.K); k < k0 + kc; ++k) dst[CodeOrderPos(k, Isa::kGroup) - k0] = 0.0f;
  }
}

// DecodePanel out of line, for Isa::kOutlinedPanel: with 16 vector registers, the table registers of the decode
// must not compete with the accumulators of the tile loop.
template <class Isa, int TN>
__attribute__((noinline)) void DecodePanelOutlined(const Nf4Weight& w, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                                   int64_t kpad, float* panel) {
  DecodePanel<Isa, TN>(w, n0, nc, k0, kc, kpad, panel);
}

// TN columns x (kLanes * V) rows per register tile.
template <class Isa, int TN, int V>
void TileTask(void* data, size_t task) {
  using Vec = typename Isa::Vec;
  constexpr int64_t kL = Isa::kLanes;
  const TileArgs& g = *static_cast<const TileArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t n0 = static_cast<int64_t>(task) * TN, nc = MinI64(TN, w.N - n0);
  alignas(64) float panel[TN * kTileKc];
  float* yt = g.yt + n0 * g.mpad;
  for (int64_t k0 = 0; k0 < g.kpad; k0 += kTileKc) {
    const int64_t kc = MinI64(kTileKc, g.kpad - k0);
    if constexpr (Isa::kOutlinedPanel) {
      DecodePanelOutlined<Isa, TN>(w, n0, nc, k0, kc, g.kpad, panel);
    } else {
      DecodePanel<Isa, TN>(w, n0, nc, k0, kc, g.kpad, panel);
    }
    for (int64_t m = 0; m < g.mpad; m += kL * V) {
      Vec acc[TN][V];
      if (k0 == 0) {
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c)
          for (int v = 0; v < V; ++v) acc[c][v] = Isa::Zero();
      } else {
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c)
          for (int v = 0; v < V; ++v) acc[c][v] = Isa::Load(yt + c * g.mpad + m + kL * v);
      }
      const float* at = g.at + k0 * g.mpad + m;
      for (int64_t k = 0; k < kc; ++k) {
        Vec a[V];
        for (int v = 0; v < V; ++v) a[v] = Isa::Load(at + k * g.mpad + kL * v);
#pragma GCC unroll 24
        for (int c = 0; c < TN; ++c) {
          const Vec wv = Isa::Set1(panel[c * kTileKc + k]);
          for (int v = 0; v < V; ++v) acc[c][v] = Isa::Fmadd(a[v], wv, acc[c][v]);
        }
      }
#pragma GCC unroll 24
      for (int c = 0; c < TN; ++c)
        for (int v = 0; v < V; ++v) Isa::Store(yt + c * g.mpad + m + kL * v, acc[c][v]);
    }
  }
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t c = 0; c < nc; ++c) {
      p.Y[m * w.N + n0 + c] = yt[c * g.mpad + m] + (p.bias != nullptr ? p.bias[n0 + c] : 0.0f);
    }
  }
}

// Y = A @ W (+ bias) for medium M: A^T packed once in code order, then one task per TN columns.
template <class Isa, int TN, int V>
void TileGemmF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kpad = w.k_blocks * w.block_size, tile_m = Isa::kLanes * V;
  const int64_t mpad = CeilDiv(p.M, tile_m) * tile_m;
  auto* at = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(kpad * mpad)));
  PackTransposedCodeOrder(p.A, p.M, w.K, mpad, Isa::kGroup, at);
  const int64_t tiles = CeilDiv(w.N, TN);
  auto* yt = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(tiles * TN * mpad)));
  TileArgs g{&p, at, yt, kpad, mpad};
  par.For(static_cast<size_t>(tiles), p.M * w.N * w.K, TileTask<Isa, TN, V>, &g);
}

// ---------------------------------------------------------------- float32, large M (packed GEMM)
//
// BLIS-style, like onnxruntime's MLAS SGEMM: A is read in place, W decoded into panels. A task owns a range of
// column groups (kGemmNr = kLanes * Isa::kGemmNv columns each) and a range of slivers (Isa::kGemmMr rows of A).
// Per chunk of Isa::kGemmKc rows of K and per column group, it decodes the exact weights W[k, n] = fl32(NF4[q] * s)
// (rule 2 of the spec) into a kGemmKc x kGemmNr panel ([k][column], L1), then sweeps its slivers through the panel
// with a kGemmMr x kGemmNr register tile: per k, kGemmNv vector loads of the panel, kGemmMr broadcasts of A (one
// float from each row), kGemmMr * kGemmNv FMAs. A last, partial sliver is copied per chunk into a zero-padded stack
// tile (no read past row M). Partial sums live in Y between chunks (float32 stores and loads are exact); the bias is
// added to the complete sum. Only k < K is ever read from the panel, so the padding codes never reach the
// arithmetic. Each weight is decoded once per task (once per call unless the rows are split).

template <class Isa>
struct GemmShape {
  static constexpr int kMr = Isa::kGemmMr;
  static constexpr int kNv = Isa::kGemmNv;
  static constexpr int64_t kNr = Isa::kLanes * Isa::kGemmNv;
  static constexpr int64_t kKc = Isa::kGemmKc;
  static_assert(kNr % 16 == 0 && kKc % 16 == 0, "the panel decode works on 16 columns x 16 k");
};

struct PackedGemmArgs {
  const Problem* p;
  const float* bias;  // [groups * kNr], zero past N; nullptr without bias
  int64_t slivers, groups;
  int64_t task_groups;   // column groups per task
  int64_t task_slivers;  // slivers per task
  int64_t col_tasks;
};

// The 8-byte runs rows[i] of 16 columns -> out[j * stride + i] = byte j of column i (j < 8).
inline void TransposeBytes16x8(const __m128i (&rows)[16], uint8_t* out, int64_t stride) {
  __m128i s1[8], s2[8], s3[8];
  for (int i = 0; i < 8; ++i) s1[i] = _mm_unpacklo_epi8(rows[2 * i], rows[2 * i + 1]);  // words: columns 2i, 2i+1
  for (int i = 0; i < 4; ++i) {
    s2[i] = _mm_unpacklo_epi16(s1[2 * i], s1[2 * i + 1]);      // dwords of columns 4i..4i+3, bytes 0-3
    s2[i + 4] = _mm_unpackhi_epi16(s1[2 * i], s1[2 * i + 1]);  // bytes 4-7
  }
  // s3[4h + 2i + p]: bytes 4h + 2p and 4h + 2p + 1 of columns 8i..8i+7, one qword each.
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 2; ++i) {
      s3[4 * h + 2 * i] = _mm_unpacklo_epi32(s2[4 * h + 2 * i], s2[4 * h + 2 * i + 1]);
      s3[4 * h + 2 * i + 1] = _mm_unpackhi_epi32(s2[4 * h + 2 * i], s2[4 * h + 2 * i + 1]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    for (int q = 0; q < 2; ++q) {
      uint8_t* o = out + (4 * h + 2 * q) * stride;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi64(s3[4 * h + q], s3[4 * h + 2 + q]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + stride), _mm_unpackhi_epi64(s3[4 * h + q], s3[4 * h + 2 + q]));
    }
  }
}

// Decodes the exact weights W[k0 + j, n0 + c] (c < kNr; j < kc rounded up to 16) into panel[j * kNr + c]; columns
// c >= nc get code 0 and scale 0. Per 16 k, the 16 columns' 8-byte runs are transposed to one byte (k pair) per
// column, decoded kLanes columns at a time and multiplied by the vector of the columns' block scales.
template <class Isa>
__attribute__((noinline)) void DecodeGemmPanel(const Nf4Weight& w, int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                               float* panel) {
  using Vec = typename Isa::Vec;
  using S = GemmShape<Isa>;
  constexpr int64_t kL = Isa::kLanes, kNr = S::kNr;
  const int64_t kb = w.k_blocks, row_bytes = kb * w.block_size / 2, kpad = kb * w.block_size;
  const int bs_log2 = __builtin_ctzll(static_cast<unsigned long long>(w.block_size));
  const typename Isa::Table table = Isa::LoadTable();
  const bool prefetch = k0 + kc < kpad;
  alignas(64) float scales[kNr] = {};
  alignas(64) uint8_t tb[8][kNr];
  Vec svec[S::kNv];
  const uint8_t* first = w.packed + n0 * row_bytes + k0 / 2;  // column n0's codes of this chunk
  for (int64_t j0 = 0; j0 < kc; j0 += 16) {
    const int64_t k = k0 + j0;
    if (j0 == 0 || (k & (w.block_size - 1)) == 0) {
      const int64_t b = k >> bs_log2;
      if (w.absmax != nullptr) {
        for (int64_t c = 0; c < nc; ++c) scales[c] = w.absmax[(n0 + c) * kb + b];
      } else {
        for (int64_t c = 0; c < nc; ++c) scales[c] = BlockScale(w, n0 + c, b);
      }
      for (int v = 0; v < S::kNv; ++v) svec[v] = Isa::Load(scales + v * kL);
    }
    for (int64_t c0 = 0; c0 < kNr; c0 += 16) {
      __m128i rows[16];
      const uint8_t* codes = first + c0 * row_bytes + j0 / 2;
      if (c0 + 16 <= nc) {
        for (int64_t i = 0; i < 16; ++i) {
          rows[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i * row_bytes));
        }
        // The panel's columns are kNr interleaved streams, which the hardware prefetchers serve poorly: request
        // the next chunk's codes (one cache line per 128 k) while decoding this one.
        if (prefetch && j0 % 128 == 0) {
          for (int64_t i = 0; i < 16; ++i) __builtin_prefetch(codes + i * row_bytes + kc / 2, 0, 3);
        }
      } else {
        for (int64_t i = 0; i < 16; ++i) {
          rows[i] = c0 + i < nc ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i * row_bytes))
                                : _mm_setzero_si128();
        }
      }
      TransposeBytes16x8(rows, tb[0] + c0, kNr);
    }
    for (int j = 0; j < 8; ++j) {
      float* even = panel + (j0 + 2 * j) * kNr;
      for (int v = 0; v < S::kNv; ++v) {
        Vec we, wo;
        Isa::Decode(tb[j] + v * kL, table, &we, &wo);
        Isa::Store(even + v * kL, Isa::Mul(we, svec[v]));
        Isa::Store(even + kNr + v * kL, Isa::Mul(wo, svec[v]));
      }
    }
  }
}

// One kMr x kNr tile of C (row stride ldc) += the kMr rows of A at a (row stride lda) times the panel ([k][kNr])
// over kc k; starts from zero unless `accumulate`; adds `bias` ([kNr]) at the end when given.
template <class Isa>
__attribute__((noinline)) void GemmMicroTile(const float* a, int64_t lda, const float* panel, int64_t kc, float* c,
                                             int64_t ldc, bool accumulate, const float* bias) {
  using Vec = typename Isa::Vec;
  using S = GemmShape<Isa>;
  constexpr int kMr = S::kMr, kNv = S::kNv;
  constexpr int64_t kL = Isa::kLanes, kNr = S::kNr;
  Vec acc[kMr][kNv];
  if (accumulate) {
    for (int m = 0; m < kMr; ++m)
      for (int v = 0; v < kNv; ++v) acc[m][v] = Isa::Load(c + m * ldc + v * kL);
  } else {
    for (int m = 0; m < kMr; ++m)
      for (int v = 0; v < kNv; ++v) acc[m][v] = Isa::Zero();
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    Vec b[kNv];
    for (int v = 0; v < kNv; ++v) b[v] = Isa::Load(panel + k * kNr + v * kL);
    for (int m = 0; m < kMr; ++m) {
      const Vec am = Isa::Set1(a[m * lda + k]);
      for (int v = 0; v < kNv; ++v) acc[m][v] = Isa::Fmadd(am, b[v], acc[m][v]);
    }
  }
  if (bias != nullptr) {
    for (int v = 0; v < kNv; ++v) {
      const Vec bv = Isa::Load(bias + v * kL);
      for (int m = 0; m < kMr; ++m) acc[m][v] = Isa::Add(acc[m][v], bv);
    }
  }
  for (int m = 0; m < kMr; ++m)
    for (int v = 0; v < kNv; ++v) Isa::Store(c + m * ldc + v * kL, acc[m][v]);
}

template <class Isa>
void PackedGemmTask(void* data, size_t task) {
  using S = GemmShape<Isa>;
  constexpr int64_t kMr = S::kMr, kNr = S::kNr, kKc = S::kKc;
  const PackedGemmArgs& g = *static_cast<const PackedGemmArgs*>(data);
  const Problem& p = *g.p;
  const int64_t K = p.w.K, N = p.w.N;
  const int64_t tc = static_cast<int64_t>(task) % g.col_tasks, tr = static_cast<int64_t>(task) / g.col_tasks;
  const int64_t g0 = tc * g.task_groups, g1 = MinI64(g.groups, g0 + g.task_groups);
  const int64_t s0 = tr * g.task_slivers, s1 = MinI64(g.slivers, s0 + g.task_slivers);
  alignas(64) float panel[kKc * kNr];
  alignas(64) float edge[kMr * kNr];    // a tile that overhangs Y (last rows or columns)
  alignas(64) float edge_a[kMr * kKc];  // the rows of a last, partial sliver, zero past M
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = MinI64(kKc, K - k0);
    const bool accumulate = k0 > 0, last = k0 + kc == K;
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t n0 = grp * kNr, nc = MinI64(kNr, N - n0);
      DecodeGemmPanel<Isa>(p.w, n0, nc, k0, kc, panel);
      const float* bias = last && g.bias != nullptr ? g.bias + n0 : nullptr;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t m0 = s * kMr, mc = MinI64(kMr, p.M - m0);
        const float* a = p.A + m0 * K + k0;
        int64_t lda = K;
        if (mc < kMr) {  // rows past M must not be read: a zero-padded copy of this chunk of the sliver
          std::memset(edge_a, 0, sizeof(edge_a));
          for (int64_t m = 0; m < mc; ++m) std::memcpy(edge_a + m * kKc, a + m * K, sizeof(float) * kc);
          a = edge_a;
          lda = kKc;
        }
        float* y = p.Y + m0 * N + n0;
        if (mc == kMr && nc == kNr) {
          GemmMicroTile<Isa>(a, lda, panel, kc, y, N, accumulate, bias);
          continue;
        }
        for (int64_t m = 0; m < mc; ++m) {
          if (accumulate) std::memcpy(edge + m * kNr, y + m * N, sizeof(float) * nc);
        }
        GemmMicroTile<Isa>(a, lda, panel, kc, edge, kNr, accumulate, bias);
        for (int64_t m = 0; m < mc; ++m) std::memcpy(y + m * N, edge + m * kNr, sizeof(float) * nc);
      }
    }
  }
}

constexpr int64_t kGemmMinTasks = 16;  // tasks per call when the shape allows (load balance over threads)

// Y = A @ W (+ bias) for many rows: tasks of column groups x slivers.
template <class Isa>
void GemmF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  using S = GemmShape<Isa>;
  const Nf4Weight& w = p.w;
  PackedGemmArgs g{};
  g.p = &p;
  g.slivers = CeilDiv(p.M, S::kMr);
  g.groups = CeilDiv(w.N, S::kNr);
  if (p.bias != nullptr) {
    auto* bias = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(g.groups * S::kNr)));
    std::memcpy(bias, p.bias, sizeof(float) * static_cast<size_t>(w.N));
    g.bias = bias;
  }
  // Columns first: each weight is then decoded once. Rows are split only when there are too few column groups.
  g.task_groups = MaxI64(1, MinI64(Isa::kGemmTaskGroups, g.groups / kGemmMinTasks));
  g.col_tasks = CeilDiv(g.groups, g.task_groups);
  const int64_t row_tasks = MinI64(CeilDiv(kGemmMinTasks, g.col_tasks), MaxI64(1, g.slivers / 4));
  g.task_slivers = CeilDiv(g.slivers, row_tasks);
  par.For(static_cast<size_t>(g.col_tasks * CeilDiv(g.slivers, g.task_slivers)), p.M * w.N * w.K, PackedGemmTask<Isa>,
          &g);
}

}  // namespace
}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_SIMD_F32_KERNELS_H_
