// simd_f32_kernels.h: the float32 kernels of the SIMD modules, written once over an ISA traits struct. Each
// module (kernels_avx2.cc, kernels_avx512.cc) instantiates them with its own traits, so every copy is built with
// that module's instruction-set flags and, like everything here, has internal linkage (see simd_common.h).
//
// The traits struct Isa provides:
//   Vec, kLanes                     a float32 vector of kLanes lanes;
//   Zero, Load, Store, Set1, Add, Mul, Fmadd(a, b, c) = a * b + c, Sum (horizontal);
//   kGroup = 2 * kLanes             codes decoded per step (kGroup / 2 bytes of B);
//   Table, LoadTable(), Decode(bytes, table, &even, &odd)
//                                   the NF4 values of the kLanes even k and the kLanes odd k of a group;
//   ScaleTable(table, s)            the table times the vector s (a block's exact weights, for Decode);
//   kMaxGemvRows                    rows of A per weight-streaming pass;
//   kOutlinedPanel                  whether the GEMM tiles call the panel decode out of line.
// docs/cpu_kernel.md explains the algorithms.
#ifndef ONNX_NF4_SIMD_F32_KERNELS_H_
#define ONNX_NF4_SIMD_F32_KERNELS_H_

#include <cstring>

#include "cpu_kernels.h"
#include "simd_common.h"

namespace onnx_nf4::cpu {
namespace {  // NOLINT(build/namespaces): see above

constexpr int64_t kGemvCols = 16;          // columns per weight-streaming task
constexpr int64_t kGemmKc = 64;            // K per decoded panel (TN x 64 floats, + the 64 x M_tile of A^T: L1)
constexpr int64_t kMinGemmRows = 16;       // float32: rows from which the tiles beat weight streaming

// ---------------------------------------------------------------- float32, small M (weight streaming)

struct GemvArgs {
  const Problem* p;
  const float* ap;  // [M][K_pad] in code order
  int64_t kpad;
};

// MR rows of A against one column, U code groups per step (U independent accumulator pairs per row).
// Columns are walked one after the other, so the weight is read as one sequential stream (several
// interleaved column streams measured markedly slower from DRAM). The scale multiplies each block's sum; two
// running totals alternate between blocks to halve their dependency chain. Not inlined: a function of its own
// gets the registers to itself (inlined into the row dispatch, it measured slower).
template <class Isa, int MR, int U>
__attribute__((noinline)) void GemvColumn(const GemvArgs& g, int64_t m0, int64_t n, int64_t b_begin, int64_t b_end, bool prefetch_next) {
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
  // One block: its sums, times its scale, into tot (a lambda: the two totals stay in registers).
  auto block = [&](int64_t b, Vec (&tot)[MR]) {
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
    const Vec s = Isa::Set1(Scale(w, n, b));
    for (int m = 0; m < MR; ++m) {
      for (int u = 2 * U; u > 1; u /= 2)
        for (int v = 0; v < u / 2; ++v) acc[m][v] = Isa::Add(acc[m][v], acc[m][v + u / 2]);
      tot[m] = Isa::Fmadd(acc[m][0], s, tot[m]);
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
    y = base + Isa::Sum(Isa::Add(tot0[m], tot1[m]));
  }
}

// Columns [n0, n1) for MR rows; one row gets up to 4 groups per step, two rows 2 (block size permitting).
// K is walked in chunks whose MR activation rows fit in L1 (32 KiB), partial sums accumulating in Y.
template <class Isa, int MR>
void GemvRows(const GemvArgs& g, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t bs = g.p->w.block_size, kb = g.p->w.k_blocks, groups = bs / Isa::kGroup;
  const int64_t chunk = MaxI64(1, (int64_t{32768} / (MR * static_cast<int64_t>(sizeof(float)))) / bs);
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

template <class Isa>
void GemvTask(void* data, size_t task) {
  const GemvArgs& g = *static_cast<const GemvArgs*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kGemvCols, n1 = MinI64(n0 + kGemvCols, g.p->w.N);
  ForRowGroups<Isa::kMaxGemvRows>(g.p->M, [&](auto rows, int64_t m0) {
    GemvRows<Isa, decltype(rows)::kValue>(g, m0, n0, n1);
  });
}

// Y = A @ W (+ bias) for few rows: A packed once in code order, then tasks of kGemvCols columns stream W.
template <class Isa>
void GemvF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kpad = w.k_blocks * w.block_size;
  auto* ap = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kpad)));
  for (int64_t m = 0; m < p.M; ++m) PackRowCodeOrder(p.A + m * w.K, w.K, Isa::kGroup, ap + m * kpad);
  GemvArgs g{&p, ap, kpad};
  par.For(static_cast<size_t>(CeilDiv(w.N, kGemvCols)), GemvTask<Isa>, &g);
}

// ---------------------------------------------------------------- float32, large M (tiles)
//
// Computes Y^T tile by tile: a task owns TN columns; per chunk of K it decodes their exact weights
// W[k, n] = NF4 * scale into a TN x kc panel (L1), then every (kLanes * V)-row tile of A^T (packed once per
// call, in code order) accumulates TN x (kLanes * V) outputs in TN * V registers. Y^T lives in a per-call
// buffer and is transposed into Y (+ bias) by the task at the end.

struct GemmArgs {
  const Problem* p;
  const float* at;  // [K_pad][M_pad] in code order along K
  float* yt;        // [N_pad][M_pad]
  int64_t kpad, mpad;
};

// Decodes the exact weights W[k0 + j, n0 + c] (j < kc, c < TN; zero for c >= nc) into
// panel[c * kGemmKc + j], in code order. The column stride is the constant kGemmKc even for a shorter last
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
    float* dst = panel + c * kGemmKc;
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
      const typename Isa::Table scaled = Isa::ScaleTable(table, Isa::Set1(Scale(w, n0 + c, b)));
      const int64_t j_end = MinI64(kc, (b + 1) * bs - k0);
      for (; j < j_end; j += Isa::kGroup) {
        Vec we, wo;
        Isa::Decode(codes + (k0 + j) / 2, scaled, &we, &wo);
        Isa::Store(dst + j, we);
        Isa::Store(dst + j + Isa::kLanes, wo);
      }
    }
  }
}

// DecodePanel out of line, for Isa::kOutlinedPanel: with 16 vector registers, the table registers of the decode
// must not compete with the accumulators of the tile loop.
template <class Isa, int TN>
__attribute__((noinline)) void DecodePanelOutlined(const Nf4Weight& w, int64_t n0, int64_t nc, int64_t k0,
                                                   int64_t kc, int64_t kpad, float* panel) {
  DecodePanel<Isa, TN>(w, n0, nc, k0, kc, kpad, panel);
}

// TN columns x (kLanes * V) rows per register tile.
template <class Isa, int TN, int V>
void GemmTask(void* data, size_t task) {
  using Vec = typename Isa::Vec;
  constexpr int64_t kL = Isa::kLanes;
  const GemmArgs& g = *static_cast<const GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t n0 = static_cast<int64_t>(task) * TN, nc = MinI64(TN, w.N - n0);
  alignas(64) float panel[TN * kGemmKc];
  float* yt = g.yt + n0 * g.mpad;
  for (int64_t k0 = 0; k0 < g.kpad; k0 += kGemmKc) {
    const int64_t kc = MinI64(kGemmKc, g.kpad - k0);
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
          const Vec wv = Isa::Set1(panel[c * kGemmKc + k]);
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

// Y = A @ W (+ bias) for many rows: A^T packed once in code order, then one task per TN columns.
template <class Isa, int TN, int V>
void GemmF32(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kpad = w.k_blocks * w.block_size, tile_m = Isa::kLanes * V;
  const int64_t mpad = CeilDiv(p.M, tile_m) * tile_m;
  auto* at = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(kpad * mpad)));
  PackTransposedCodeOrder(p.A, p.M, w.K, mpad, Isa::kGroup, at);
  const int64_t tiles = CeilDiv(w.N, TN);
  auto* yt = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(tiles * TN * mpad)));
  GemmArgs g{&p, at, yt, kpad, mpad};
  par.For(static_cast<size_t>(tiles), GemmTask<Isa, TN, V>, &g);
}

}  // namespace
}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_SIMD_F32_KERNELS_H_
