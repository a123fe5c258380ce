// simd_i8_kernels.h: the accuracy_level 4 kernels (int8 activations, integer dot products) of the SIMD modules,
// written once over an ISA traits struct. Each int8 module (kernels_i8_avx2.cc, kernels_i8_avx2vnni.cc,
// kernels_i8_avx512.cc) instantiates them with its own traits, so every copy is built with that module's
// instruction-set flags and has internal linkage (see simd_common.h).
//
// The traits struct I provides:
//   VecI, VecF, kLanes               int32 / float32 vectors of kLanes lanes (4 * kLanes bytes);
//   kGroup, kDecodeVecs              codes decoded per step (kGroup / 2 bytes of B, kGroup weight bytes in
//                                    kDecodeVecs vectors);
//   kBiased                          whether decoded weights are unsigned bytes kNF4I8 + 128 (vpdpbusd: the
//                                    unsigned operand), so that every block's integer sum carries
//                                    128 * sum(q_a), removed through the per-block activation sums;
//   ZeroI, LoadI, StoreI, AddI, Broadcast32(p) (the 4 bytes at p in every lane), FirstLaneI(x) (x, then zeros);
//   ZeroF, LoadF, StoreF, Set1F, AddF, MulF, MaxF, AndNotF, FmaddF(a, b, c) = a * b + c, CvtF (int32 to
//   float32), SumF (horizontal);
//   DecodeTable(), Decode(bytes, table, out) the kGroup weight bytes of kGroup / 2 code bytes in code order
//                                    (the kGroup / 2 even k, then the kGroup / 2 odd k) into out[kDecodeVecs];
//   Shared, Share(v)                 an operand reused by several dot products, prepared once;
//   DotSharedW(acc, Shared w, VecI a) / DotSharedA(acc, VecI w, Shared a)
//                                    acc + the sums of 4 adjacent products of weight and activation bytes;
//   kGemvRows, kGemvColumns, kGemmV, kGemmTN
//                                    the register blocking of the kernels below;
//   kMinGemmRows                     rows from which the packed-panel GEMM beats weight streaming.
// docs/cpu_kernel.md explains the algorithms.
#ifndef ONNX_NF4_SIMD_I8_KERNELS_H_
#define ONNX_NF4_SIMD_I8_KERNELS_H_

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "cpu_kernels.h"
#include "simd_common.h"

namespace onnx_nf4::cpu {
namespace {  // NOLINT(build/namespaces): see simd_common.h

constexpr int64_t kI8GemvCols = 16;  // columns per weight-streaming task
constexpr int64_t kI8Chunk = 64;     // blocks whose combined scales a weight-streaming column prepares at once

// ---------------------------------------------------------------- activations

// round_half_even(x) (the default rounding mode) clamped to [-127, 127], for |x| <= 127 up to rounding.
inline float RoundToI8(float x) {
  const float r = std::nearbyint(x);
  return r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
}

// QuantizeRowInt8 (cpu_kernels.h) with the block maxima taken kLanes at a time and the code order written group
// by group (group: a power of two dividing block_size, or 2), so that the compiler vectorizes both loops.
template <class I>
void QuantizeRow(const float* a, int64_t K, int64_t bs, int64_t kb, int64_t group, int8_t* q, float* scale,
                 int32_t* qsum) {
  using VecF = typename I::VecF;
  const VecF sign = I::Set1F(-0.0f);
  const int64_t half = group / 2;
  for (int64_t b = 0; b < kb; ++b) {
    const int64_t k0 = b * bs, k1 = MinI64(k0 + bs, K);
    VecF vmax = I::ZeroF();
    int64_t k = k0;
    for (; k + I::kLanes <= k1; k += I::kLanes) vmax = I::MaxF(vmax, I::AndNotF(sign, I::LoadF(a + k)));
    alignas(64) float lanes[I::kLanes];
    I::StoreF(lanes, vmax);
    float amax = 0.0f;
    for (int64_t l = 0; l < I::kLanes; ++l) amax = std::fmax(amax, lanes[l]);
    for (; k < k1; ++k) amax = std::fmax(amax, std::fabs(a[k]));
    const float inv = QuantizeFactor(amax);
    int32_t sum = 0;
    k = k0;
    for (; k + group <= k1; k += group) {  // whole groups: evens then odds
      int8_t* dst = q + k;
      for (int64_t i = 0; i < half; ++i) {
        const float e = RoundToI8(a[k + 2 * i] * inv), o = RoundToI8(a[k + 2 * i + 1] * inv);
        dst[i] = static_cast<int8_t>(e);
        dst[half + i] = static_cast<int8_t>(o);
        sum += static_cast<int32_t>(e) + static_cast<int32_t>(o);
      }
    }
    for (; k < k1; ++k) {  // the last, partial group (K not a multiple of it)
      const float v = RoundToI8(a[k] * inv);
      q[CodeOrderPos(k, group)] = static_cast<int8_t>(v);
      sum += static_cast<int32_t>(v);
    }
    scale[b] = amax / kInt8Levels;
    if (qsum != nullptr) qsum[b] = sum;
  }
}

// Code order for the int8 kernels: the decode step when it divides the block, else 32 when that does (the GEMM
// panel is then decoded 32 codes at a time), else natural order (block 16: the panel is decoded a code at a
// time).
template <class I>
inline int64_t I8Group(int64_t block_size) {
  return block_size % I::kGroup == 0 ? I::kGroup : (block_size % 32 == 0 ? 32 : 2);
}

// The 16 weight bytes of the codes, biased by 128 when `biased`.
inline __m128i I8Table128(bool biased) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kNF4I8));
  return biased ? _mm_add_epi8(t, _mm_set1_epi8(static_cast<char>(-128))) : t;
}

// ---------------------------------------------------------------- small M: weight streaming

struct I8GemvArgs {
  const Problem* p;
  const int8_t* qa;     // [M][K_pad], code order of I::kGroup
  const float* ascale;  // [M][k_blocks]
  const int32_t* qsum;  // [M][k_blocks] (kBiased only)
  int64_t kpad;
};

// MR rows against column n, U decode steps per iteration (U independent accumulators per row). Per chunk of
// blocks, f[m][j] = scale_w * scale_a is prepared first, so a block costs its dot products, one convert and one
// FMA; for biased weights, -128 * qsum of the block is added to its integer sum before the convert (exact, and
// an infinite scale then meets only its own block's sum: no Inf - Inf).
template <class I, int MR, int U>
__attribute__((noinline)) void I8GemvColumn(const I8GemvArgs& g, int64_t m0, int64_t n) {
  using VecI = typename I::VecI;
  using VecF = typename I::VecF;
  constexpr int64_t kStep = I::kGroup;
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const uint8_t* codes = w.packed + n * kb * bs / 2;
  const auto table = I::DecodeTable();
  alignas(64) float sw[kI8Chunk];
  alignas(64) float f[MR][kI8Chunk];
  PrefetchScales(w, n + kScaleLookahead);
  VecF tot0[MR], tot1[MR];
  for (int m = 0; m < MR; ++m) tot0[m] = tot1[m] = I::ZeroF();
  const int64_t padded_block = w.K % bs != 0 ? kb - 1 : -1;  // the last block when it runs past K
  float padded_tot[MR] = {};                                 // its scaled sum, per row
  constexpr int D = I::kDecodeVecs, kBytes = 4 * I::kLanes;  // vectors per decode step, bytes per vector
  auto block = [&](int64_t b, int64_t j, VecF(&tot)[MR]) {
    VecI acc[MR][U * D];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < U * D; ++u) acc[m][u] = I::ZeroI();
    const uint8_t* c = codes + b * (bs / 2);
    const uint8_t* const c_end = c + bs / 2;
    const int8_t* a = g.qa + m0 * g.kpad + b * bs;
    do {  // at least one trip (block_size >= U * kGroup): acc stays in registers
      for (int u = 0; u < U; ++u) {
        VecI wq[D];
        I::Decode(c + u * (kStep / 2), table, wq);
        for (int d = 0; d < D; ++d) {
          const auto ws = I::Share(wq[d]);
          for (int m = 0; m < MR; ++m) {
            VecI& sum = acc[m][u * D + d];
            sum = I::DotSharedW(sum, ws, I::LoadI(a + m * g.kpad + u * kStep + d * kBytes));
          }
        }
      }
      c += U * (kStep / 2);
      a += U * kStep;
    } while (c < c_end);
    for (int m = 0; m < MR; ++m) {
      for (int u = 1; u < U * D; ++u) acc[m][0] = I::AddI(acc[m][0], acc[m][u]);
      if constexpr (I::kBiased) acc[m][0] = I::AddI(acc[m][0], I::FirstLaneI(-128 * g.qsum[(m0 + m) * kb + b]));
      if (b == padded_block) {  // lanes of padding alone hold 0: scale the block's whole sum (0 * Inf is NaN)
        padded_tot[m] = I::SumF(I::CvtF(acc[m][0])) * f[m][j];
      } else {
        tot[m] = I::FmaddF(I::CvtF(acc[m][0]), I::Set1F(f[m][j]), tot[m]);
      }
    }
  };
  for (int64_t b0 = 0; b0 < kb; b0 += kI8Chunk) {
    const int64_t nb = MinI64(kI8Chunk, kb - b0);
    const int64_t nv = CeilDiv(nb, I::kLanes) * I::kLanes;  // whole vectors: the tail of sw is zero
    if (w.absmax != nullptr && nb == nv) {
      std::memcpy(sw, w.absmax + n * kb + b0, sizeof(float) * static_cast<size_t>(nb));
    } else {
      for (int64_t j = 0; j < nv; ++j) sw[j] = j < nb ? BlockScale(w, n, b0 + j) : 0.0f;
    }
    for (int m = 0; m < MR; ++m) {
      const int64_t row = (m0 + m) * kb + b0;
      for (int64_t j = 0; j < nv; j += I::kLanes) {  // ascale has kLanes readable entries past kb
        I::StoreF(f[m] + j, I::MulF(I::LoadF(sw + j), I::LoadF(g.ascale + row + j)));
      }
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
    float y = I::SumF(I::AddF(tot0[m], tot1[m])) + padded_tot[m];
    y *= 1.0f / kInt8Levels;
    if (p.bias != nullptr) y += p.bias[n];
    p.Y[(m0 + m) * w.N + n] = y;
  }
}

// One row m against NC consecutive columns [n, n + NC): the decode step of an LLM (M = 1), where K is small enough
// that fixed costs per column (the scale preparation, a horizontal sum, the call) would weigh. Each step's
// activations are loaded (and prepared: Share) once for all NC columns, whose codes follow each other in memory (one
// sequential stream); the -128 * qsum start of a block's integer sum is made once for all of them. Otherwise as
// I8GemvColumn: one integer sum per (column, block), converted and scaled into one float total per column.
template <class I, int NC>
__attribute__((noinline)) void I8GemvRowColumns(const I8GemvArgs& g, int64_t m, int64_t n) {
  using VecI = typename I::VecI;
  using VecF = typename I::VecF;
  constexpr int64_t kStep = I::kGroup;
  constexpr int D = I::kDecodeVecs, kBytes = 4 * I::kLanes;  // vectors per decode step, bytes per vector
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, col_bytes = kb * bs / 2;
  const uint8_t* codes = w.packed + n * col_bytes;
  const int8_t* arow = g.qa + m * g.kpad;
  const auto table = I::DecodeTable();
  alignas(64) float f[NC][kI8Chunk];
  for (int c = 0; c < NC; ++c) PrefetchScales(w, n + NC + c);
  VecF tot[NC];
  for (int c = 0; c < NC; ++c) tot[c] = I::ZeroF();
  const int64_t padded_block = w.K % bs != 0 ? kb - 1 : -1;  // the last block when it runs past K
  float padded_tot[NC] = {};                                 // its scaled sum, per column
  for (int64_t b0 = 0; b0 < kb; b0 += kI8Chunk) {
    const int64_t nb = MinI64(kI8Chunk, kb - b0);
    const int64_t nv = CeilDiv(nb, I::kLanes) * I::kLanes;  // whole vectors: the tail of f is zero
    const float* as = g.ascale + m * kb + b0;               // kLanes readable entries past kb
    for (int c = 0; c < NC; ++c) {
      if (w.absmax != nullptr && nb == nv) {
        const float* sw = w.absmax + (n + c) * kb + b0;
        for (int64_t j = 0; j < nv; j += I::kLanes) I::StoreF(f[c] + j, I::MulF(I::LoadF(sw + j), I::LoadF(as + j)));
      } else {
        for (int64_t j = 0; j < nv; ++j) f[c][j] = j < nb ? BlockScale(w, n + c, b0 + j) * as[j] : 0.0f;
      }
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t b = b0 + j;
      const VecI start = I::kBiased ? I::FirstLaneI(-128 * g.qsum[m * kb + b]) : I::ZeroI();
      VecI acc[NC];
      for (int c = 0; c < NC; ++c) acc[c] = start;
      const int8_t* a = arow + b * bs;
      const uint8_t* cb = codes + b * (bs / 2);
      for (int64_t k = 0; k < bs; k += kStep) {
        typename I::Shared as_k[D];
        for (int d = 0; d < D; ++d) as_k[d] = I::Share(I::LoadI(a + k + d * kBytes));
        for (int c = 0; c < NC; ++c) {
          VecI wq[D];
          I::Decode(cb + c * col_bytes + k / 2, table, wq);
          for (int d = 0; d < D; ++d) acc[c] = I::DotSharedA(acc[c], wq[d], as_k[d]);
        }
      }
      for (int c = 0; c < NC; ++c) {
        if (b == padded_block) {  // lanes of padding alone hold 0: scale the block's whole sum (0 * Inf is NaN)
          padded_tot[c] = I::SumF(I::CvtF(acc[c])) * f[c][j];
        } else {
          tot[c] = I::FmaddF(I::CvtF(acc[c]), I::Set1F(f[c][j]), tot[c]);
        }
      }
    }
  }
  for (int c = 0; c < NC; ++c) {
    float y = I::SumF(tot[c]) + padded_tot[c];
    y *= 1.0f / kInt8Levels;
    if (p.bias != nullptr) y += p.bias[n + c];
    p.Y[m * w.N + n + c] = y;
  }
}

template <class I>
void I8GemvTask(void* data, size_t task) {
  const I8GemvArgs& g = *static_cast<const I8GemvArgs*>(data);
  const int64_t n0 = static_cast<int64_t>(task) * kI8GemvCols, n1 = MinI64(n0 + kI8GemvCols, g.p->w.N);
  if (g.p->M == 1) {  // a single row: NC columns at a time
    constexpr int NC = I::kGemvColumns;
    int64_t n = n0;
    for (; n + NC <= n1; n += NC) I8GemvRowColumns<I, NC>(g, 0, n);
    for (; n < n1; ++n) I8GemvRowColumns<I, 1>(g, 0, n);
    return;
  }
  const bool pairs = g.p->w.block_size % (2 * I::kGroup) == 0;  // two independent sums per block
  ForRowGroups<I::kGemvRows>(g.p->M, [&](auto rows, int64_t m0) {
    constexpr int kRows = decltype(rows)::kValue;
    for (int64_t n = n0; n < n1; ++n) {
      if constexpr (kRows <= 2) {
        pairs ? I8GemvColumn<I, kRows, 2>(g, m0, n) : I8GemvColumn<I, kRows, 1>(g, m0, n);
      } else {
        I8GemvColumn<I, kRows, 1>(g, m0, n);
      }
    }
  });
}

// Y = A @ W (+ bias) for few rows, int8 activations; needs block_size % I::kGroup == 0.
template <class I>
void I8Gemv(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kb = w.k_blocks, kpad = kb * w.block_size;
  auto* qa = static_cast<int8_t*>(scratch.Zeroed(static_cast<size_t>(p.M * kpad)));
  // kLanes entries past the last row: the scale preparation reads whole vectors (the extra lanes meet zero scales)
  const auto entries = static_cast<size_t>(p.M * kb + I::kLanes);
  auto* ascale = static_cast<float*>(scratch.Zeroed(sizeof(float) * entries));
  int32_t* qsum = nullptr;
  if (I::kBiased) qsum = static_cast<int32_t*>(scratch.Zeroed(sizeof(int32_t) * entries));
  for (int64_t m = 0; m < p.M; ++m) {
    QuantizeRow<I>(p.A + m * w.K, w.K, w.block_size, kb, I::kGroup, qa + m * kpad, ascale + m * kb,
                   qsum != nullptr ? qsum + m * kb : nullptr);
  }
  I8GemvArgs g{&p, qa, ascale, qsum, kpad};
  par.For(static_cast<size_t>(CeilDiv(w.N, kI8GemvCols)), p.M * w.N * w.K, I8GemvTask<I>, &g);
}

// ---------------------------------------------------------------- large M: packed panels
//
// A is quantized once per call into row tiles of R = kLanes * V rows: per 4 codes (in code order) of K, the 4
// bytes of each of the R rows side by side (one vector of V per 4 codes), with per (row, block) scales and, for
// biased weights, -128 * sum(q_a) per (row, block) as the integer start of each block's sums. A task owns TN
// columns; per chunk of K it decodes their weight bytes once into a panel (column j at j * kStride, in code
// order), and every row tile accumulates TN x R outputs: per 4 codes, one broadcast of each column's 4 weight
// bytes against the V activation vectors (4 products summed per int32 lane). At each block end the integer
// sums are converted and multiplied by scale_w * scale_a into float32 totals (registers for the chunk, or Y^T
// in memory). Y^T is transposed into Y (+ bias) at the end of the task.

struct I8GemmArgs {
  const Problem* p;
  int8_t* qrows;   // [M][K_pad] quantized rows, code order of `group` (scratch of the quantize step)
  int8_t* apack;   // [tiles][K_pad / 4][R][4]
  float* sa;       // [tiles][k_blocks][R]
  int32_t* start;  // [tiles][k_blocks][R]: -128 * sum(q_a) (kBiased) or 0
  float* yt;       // [N_pad][M_pad]
  int64_t kpad, mpad, group, kc;
};

// Quantizes the rows of tile t and packs them.
template <class I, int V>
void I8GemmQuantizeTask(void* data, size_t task) {
  constexpr int64_t R = I::kLanes * V;
  const I8GemmArgs& g = *static_cast<const I8GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t kb = w.k_blocks, t = static_cast<int64_t>(task), m0 = t * R;
  int8_t* tile = g.apack + t * g.kpad * R;
  float* sa = g.sa + t * kb * R;
  int32_t* start = g.start + t * kb * R;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    if (m >= p.M) {  // padding rows: all zero
      for (int64_t b = 0; b < kb; ++b) sa[b * R + r] = 0.0f, start[b * R + r] = 0;
      for (int64_t k4 = 0; k4 < g.kpad / 4; ++k4) std::memset(tile + (k4 * R + r) * 4, 0, 4);
      continue;
    }
    int8_t* q = g.qrows + m * g.kpad;
    alignas(64) float scale[kI8Chunk];
    alignas(64) int32_t sums[kI8Chunk];
    for (int64_t b0 = 0; b0 < kb; b0 += kI8Chunk) {  // blocks of this row, a chunk at a time (stack buffers)
      const int64_t nb = MinI64(kI8Chunk, kb - b0);
      const int64_t k0 = b0 * w.block_size;
      QuantizeRow<I>(p.A + m * w.K + k0, MaxI64(0, MinI64(w.K - k0, nb * w.block_size)), w.block_size, nb, g.group,
                     q + k0, scale, sums);
      for (int64_t j = 0; j < nb; ++j) {
        sa[(b0 + j) * R + r] = scale[j];
        start[(b0 + j) * R + r] = I::kBiased ? -128 * sums[j] : 0;
      }
    }
    for (int64_t k4 = 0; k4 < g.kpad / 4; ++k4) std::memcpy(tile + (k4 * R + r) * 4, q + 4 * k4, 4);
  }
}

// Decodes the weight bytes of columns [n0, n0 + TN) (zero for n >= N), K range [k0, k0 + kc), into
// panel[j * kStride + i] (code order of g.group), and their scales into sw[b * TN + j] (0 for n >= N).
template <class I, int TN, int64_t kStride>
__attribute__((noinline)) void I8DecodePanel(const I8GemmArgs& g, int64_t n0, int64_t k0, int64_t kc, uint8_t* panel,
                                             float* sw) {
  const Nf4Weight& w = g.p->w;
  const int64_t bs = w.block_size, b0 = k0 / bs, nb = kc / bs, row_bytes = g.kpad / 2;
  const auto table = I::DecodeTable();
  for (int j = 0; j < TN; ++j) {
    const int64_t n = n0 + j;
    uint8_t* dst = panel + j * kStride;
    if (n >= w.N) {
      std::memset(dst, I::kBiased ? 128 : 0, static_cast<size_t>(kc));
      for (int64_t b = 0; b < nb; ++b) sw[b * TN + j] = 0.0f;
      continue;
    }
    for (int64_t b = 0; b < nb; ++b) sw[b * TN + j] = BlockScale(w, n, b0 + b);
    const uint8_t* codes = w.packed + n * row_bytes + k0 / 2;
    // The TN columns are interleaved streams, which the hardware prefetchers serve poorly: request the codes
    // that this column's slot decodes next now, the next chunk or, after the last one, the first chunk of the
    // column TN further (the next task, usually run by the same thread) and its scales.
    const uint8_t* next = nullptr;
    int64_t next_len = 0;  // codes
    if (k0 + kc < g.kpad) {
      next = codes + kc / 2;
      next_len = MinI64(g.kc, g.kpad - k0 - kc);
    } else if (n + TN < w.N) {
      next = w.packed + (n + TN) * row_bytes;
      next_len = MinI64(g.kc, g.kpad);
      PrefetchScales(w, n + TN);
    }
    for (int64_t off = 0; off < next_len / 2; off += 64) __builtin_prefetch(next + off, 0, 3);
    if (g.group == I::kGroup) {
      for (int64_t i = 0; i < kc; i += I::kGroup) {
        typename I::VecI wq[I::kDecodeVecs];
        I::Decode(codes + i / 2, table, wq);
        for (int d = 0; d < I::kDecodeVecs; ++d) I::StoreI(dst + i + d * 4 * I::kLanes, wq[d]);
      }
    } else if (g.group == 32) {  // blocks of 32 codes: 16 bytes a step (the same in every module)
      const __m128i mask = _mm_set1_epi8(0x0F), table32 = I8Table128(I::kBiased);
      for (int64_t i = 0; i < kc; i += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm_shuffle_epi8(table32, _mm_and_si128(_mm_srli_epi16(v, 4), mask)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 16), _mm_shuffle_epi8(table32, _mm_and_si128(v, mask)));
      }
    } else {  // natural order, a code at a time (block size 16)
      const uint8_t bias = I::kBiased ? 128 : 0;
      for (int64_t i = 0; i < kc / 2; ++i) {
        dst[2 * i] = static_cast<uint8_t>(kNF4I8[codes[i] >> 4] + bias);
        dst[2 * i + 1] = static_cast<uint8_t>(kNF4I8[codes[i] & 0xF] + bias);
      }
    }
  }
}

// One row tile (R = kLanes * V rows) against the TN columns of the panel, K range of the panel (nb blocks of
// bs), totals accumulated into yt (stride mpad, zeroed by the task).
template <class I, int TN, int V, int64_t kStride>
__attribute__((noinline)) void I8GemmTile(const uint8_t* panel, const float* sw, const int8_t* at, const float* sa,
                                          const int32_t* start, int64_t nb, int64_t bs, float* yt, int64_t mpad) {
  using VecI = typename I::VecI;
  using VecF = typename I::VecF;
  constexpr int64_t L = I::kLanes, R = L * V;
  for (int64_t b = 0; b < nb; ++b) {
    VecI acc[TN][V];
    for (int v = 0; v < V; ++v) {
      const VecI s = I::LoadI(start + b * R + v * L);
      for (int j = 0; j < TN; ++j) acc[j][v] = s;
    }
    const uint8_t* wp = panel + b * bs;
    const int8_t* ap = at + b * bs * R;
    const uint8_t* const wp_end = wp + bs;
    do {  // bs / 4 >= 4 steps: at least one trip
      typename I::Shared a[V];
      for (int v = 0; v < V; ++v) a[v] = I::Share(I::LoadI(ap + v * L * 4));
#pragma GCC unroll 16
      for (int j = 0; j < TN; ++j) {
        const VecI wj = I::Broadcast32(wp + j * kStride);
        for (int v = 0; v < V; ++v) acc[j][v] = I::DotSharedA(acc[j][v], wj, a[v]);
      }
      wp += 4;
      ap += R * 4;
    } while (wp < wp_end);
    // The totals live in Y^T (L1): in registers they would crowd the accumulators.
    for (int v = 0; v < V; ++v) {
      const VecF s = I::LoadF(sa + b * R + v * L);
      for (int j = 0; j < TN; ++j) {
        float* y = yt + j * mpad + v * L;
        I::StoreF(y, I::FmaddF(I::CvtF(acc[j][v]), I::MulF(s, I::Set1F(sw[b * TN + j])), I::LoadF(y)));
      }
    }
  }
}

template <class I, int TN, int V, int64_t kStride>
void I8GemmTask(void* data, size_t task) {
  constexpr int64_t R = I::kLanes * V;
  const I8GemmArgs& g = *static_cast<const I8GemmArgs*>(data);
  const Problem& p = *g.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks;
  const int64_t n0 = static_cast<int64_t>(task) * TN, nc = MinI64(TN, w.N - n0), tiles = g.mpad / R;
  alignas(64) uint8_t panel[TN * kStride];
  alignas(64) float sw[TN * (kStride / 16)];
  float* yt = g.yt + n0 * g.mpad;
  std::memset(yt, 0, sizeof(float) * static_cast<size_t>(TN * g.mpad));
  for (int64_t k0 = 0; k0 < g.kpad; k0 += g.kc) {
    const int64_t kc = MinI64(g.kc, g.kpad - k0);
    I8DecodePanel<I, TN, kStride>(g, n0, k0, kc, panel, sw);
    for (int64_t t = 0; t < tiles; ++t) {
      I8GemmTile<I, TN, V, kStride>(panel, sw, g.apack + t * g.kpad * R + k0 * R, g.sa + (t * kb + k0 / bs) * R,
                                    g.start + (t * kb + k0 / bs) * R, kc / bs, bs, yt + t * R, g.mpad);
    }
  }
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t c = 0; c < nc; ++c) {
      p.Y[m * w.N + n0 + c] = yt[c * g.mpad + m] * (1.0f / kInt8Levels) + (p.bias != nullptr ? p.bias[n0 + c] : 0.0f);
    }
  }
}

// Y = A @ W (+ bias) for many rows, int8 activations; any block size.
template <class I>
void I8Gemm(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  constexpr int V = I::kGemmV, TN = I::kGemmTN;
  constexpr int64_t R = I::kLanes * V;
  constexpr int64_t kSmallStride = 512 + 64, kLargeStride = 4096 + 64;  // + 64: columns in different L1 sets
  const Nf4Weight& w = p.w;
  const int64_t kb = w.k_blocks, kpad = kb * w.block_size;
  const int64_t tiles = CeilDiv(p.M, R), mpad = tiles * R;
  I8GemmArgs g{};
  g.p = &p;
  g.kpad = kpad;
  g.mpad = mpad;
  g.group = I8Group<I>(w.block_size);
  g.kc = MaxI64(w.block_size, 512);
  g.qrows = static_cast<int8_t*>(scratch.Zeroed(static_cast<size_t>(p.M * kpad)));
  g.apack = static_cast<int8_t*>(scratch.Uninitialized(static_cast<size_t>(mpad * kpad)));
  g.sa = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(mpad * kb)));
  g.start = static_cast<int32_t*>(scratch.Uninitialized(sizeof(int32_t) * static_cast<size_t>(mpad * kb)));
  const int64_t col_tasks = CeilDiv(w.N, TN);
  g.yt = static_cast<float*>(scratch.Uninitialized(sizeof(float) * static_cast<size_t>(col_tasks * TN * mpad)));
  const int64_t work = p.M * w.N * w.K;
  par.For(static_cast<size_t>(tiles), p.M * w.K, I8GemmQuantizeTask<I, V>, &g);
  if (g.kc <= kSmallStride - 64) {
    par.For(static_cast<size_t>(col_tasks), work, I8GemmTask<I, TN, V, kSmallStride>, &g);
  } else {
    par.For(static_cast<size_t>(col_tasks), work, I8GemmTask<I, TN, V, kLargeStride>, &g);
  }
}

// accuracy_level 4: weight streaming for few rows (when the block holds whole decode steps), else the panels.
template <class I>
void I8MatMul(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.M < I::kMinGemmRows && p.w.block_size % I::kGroup == 0) {
    I8Gemv<I>(p, par, scratch);
  } else {
    I8Gemm<I>(p, par, scratch);
  }
}

}  // namespace
}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_SIMD_I8_KERNELS_H_
