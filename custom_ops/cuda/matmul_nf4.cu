// matmul_nf4.cu: the CUDA kernels of onnx_nf4::MatMulNF4 (docs/MatMulNF4.md, docs/gpu.md).
//
// One source, three compilers:
//   * nvcc, as part of libonnx_nf4_ops (custom_ops/cmake/cuda.cmake): the kernels plus the host launcher
//     LaunchMatMulNF4 (matmul_nf4_cuda.h);
//   * NVRTC, through cupy.RawModule (onnx_nf4/op/cupy_backend.py): NVRTC defines __CUDACC_RTC__, which hides the
//     host code; the kernels use no header but the NF4 table (which the Python loader inlines) and take
//     only pointers and ints, so they are named by the same template-ids from both sides;
//   * the host C++ compiler with ONNX_NF4_CUDA_EMU defined (custom_ops/cuda/emu, tests/cuda_emu.py): kernels and
//     launcher run on the CPU under a CUDA-semantics emulation. Every inline PTX statement sits in a small wrapper
//     with an #ifdef ONNX_NF4_CUDA_EMU branch (and so does the launch statement); without the macro the PTX is
//     the same as with no branch at all.
//
// Kernels (Y[M, N] = A[M, K] @ W + bias; W[k, n] = NF4[code] * scale, fp32 accumulation):
//   nf4_gemv_simt<T, MT>  CUDA cores, one warp per output column n (k_split warps per column, reduced in
//                         shared memory), MT rows of A per CTA. Each lane streams 16 bytes (32 codes) of B
//                         per step, decodes every code once with a register table (one shuffle per code),
//                         multiplies by the block scale in float32 (rule 2 exactly) and uses the weight for
//                         all MT rows. float32 A uses it; it also serves float16 / bfloat16 on request.
//   nf4_gemv_mma<T, MT>   tensor cores (mma.m16n8k16, float32 accumulators) for float16 / bfloat16 A, M <= 32. A
//                         warp owns 16 output columns x MT rows; W is fed as the sum of two T values per code
//                         (hi + lo, decoded with one shuffle per code from a split table), the block scale
//                         is applied in float32 to the partial sums of each block. See docs/gpu.md for the
//                         error bound (2^-23 relative per weight for float16, 2^-17 for bfloat16).
//   nf4_gemm_mma<T>       the same arithmetic for M > 32, tiled: a CTA decodes a 128 x 64 tile of codes into
//                         shared memory once for 64 rows of A and runs mma on ldmatrix operands.
// Both kernels read B with 128-bit non-allocating loads aligned with the blocks, decode double-quantized
// absmax in-kernel (fl32(fl32(code * nested) + offset), no FMA) and add the bias before the single rounding to T.
#include "onnx_nf4/nf4_codebook.h"

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "matmul_nf4_cuda.h"
#endif

namespace onnx_nf4 {
namespace gpu {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// Storage types of the 16-bit activations (bit patterns; converted with PTX, so no header is needed).
struct f16 {
  u16 bits;
};
struct bf16 {
  u16 bits;
};

constexpr u32 kFullMask = 0xffffffffu;
constexpr int kWarps = 8;  // warps per CTA, for both kernels
constexpr int kThreads = 32 * kWarps;

__constant__ float c_nf4[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_VALUES};

// ---------------------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(f16 v) {
#ifdef ONNX_NF4_CUDA_EMU
  return cuda_emu::ptx::cvt_f32_f16(v.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
#endif
}
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(static_cast<u32>(v.bits) << 16); }

__device__ __forceinline__ u16 f32_to_f16_bits(float v) {
#ifdef ONNX_NF4_CUDA_EMU
  return cuda_emu::ptx::cvt_rn_f16_f32(v);
#else
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
#endif
}
__device__ __forceinline__ u16 f32_to_bf16_bits(float v) {
#ifdef ONNX_NF4_CUDA_EMU
  return cuda_emu::ptx::cvt_rn_bf16_f32(v);
#else
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
#endif
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ f16 from_float<f16>(float v) {
  f16 r;
  r.bits = f32_to_f16_bits(v);
  return r;
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float v) {
  bf16 r;
  r.bits = f32_to_bf16_bits(v);
  return r;
}

// The two-term split of a float32 v into T (f16 or bf16): v ~= hi + lo with hi = rn(v), lo = rn(v - hi),
// packed as hi | lo << 16.
template <typename T>
__device__ __forceinline__ u32 split_pair(float v) {
  const T hi = from_float<T>(v);
  const T lo = from_float<T>(__fsub_rn(v, to_float(hi)));
  return static_cast<u32>(hi.bits) | (static_cast<u32>(lo.bits) << 16);
}

// ---------------------------------------------------------------------------------------------------------
// Loads
// ---------------------------------------------------------------------------------------------------------

// Streaming 128-bit load of packed codes: read once, so not kept in L1.
__device__ __forceinline__ void ld_stream_v4(const void* p, u32 (&q)[4]) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::ld_global_nc_v4(p, q);
#else
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(q[0]), "=r"(q[1]), "=r"(q[2]), "=r"(q[3])
               : "l"(p));
#endif
}
__device__ __forceinline__ void ld_stream_v2(const void* p, u32& a, u32& b) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::ld_global_nc_v2(p, a, b);
#else
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
#endif
}
// Cached 128-bit read-only load (activations, reused by every warp of the SM).
__device__ __forceinline__ void ld_v4(const void* p, u32 (&q)[4]) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::ld_global_nc_v4(p, q);
#else
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(q[0]), "=r"(q[1]), "=r"(q[2]), "=r"(q[3]) : "l"(p));
#endif
}

// Bytes [off, off + 16) of a packed row of row_bytes bytes (off % 8 == 0, row_bytes % 8 == 0); bytes past the
// row read as 0. vec16: the row and the buffer are 16-byte aligned (row_bytes % 16 == 0), so one load does.
__device__ __forceinline__ void load_codes(const u8* row, i64 off, i64 row_bytes, bool vec16, u32 (&q)[4]) {
  q[0] = q[1] = q[2] = q[3] = 0u;
  if (vec16) {
    if (off < row_bytes) ld_stream_v4(row + off, q);
  } else {
    if (off < row_bytes) ld_stream_v2(row + off, q[0], q[1]);
    if (off + 8 < row_bytes) ld_stream_v2(row + off + 8, q[2], q[3]);
  }
}

// The float32 scale of block f = n * k_blocks + b (rule 1 of docs/MatMulNF4.md).
struct Scales {
  const float* absmax;     // float32 [N * k_blocks], or null when absmax_codes is set
  const u8* absmax_codes;  // uint8 [N * k_blocks] (double quantization)
  const float* nested_absmax;
  const float* nested_code;
  const float* absmax_offset;
  int nested_shift;  // log2(nested_block_size)
};

__device__ __forceinline__ float block_scale(const Scales& s, i64 f) {
  if (s.absmax_codes == nullptr) return __ldg(s.absmax + f);
  const float code = __ldg(s.nested_code + __ldg(s.absmax_codes + f));
  return __fadd_rn(__fmul_rn(code, __ldg(s.nested_absmax + (f >> s.nested_shift))), __ldg(s.absmax_offset));
}

// Eight activations A[row][k .. k + 8) as float32 (0 past K). vec: K and the buffer allow 16-byte loads
// (K % (16 / sizeof(T)) == 0, 16-byte aligned); k % 8 == 0.
__device__ __forceinline__ void load_act8(const float* row, i64 k, i64 K, bool vec, float (&a)[8]) {
  if (vec) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      u32 q[4] = {0u, 0u, 0u, 0u};
      if (k + 4 * h < K) ld_v4(row + k + 4 * h, q);
#pragma unroll
      for (int e = 0; e < 4; ++e) a[4 * h + e] = __uint_as_float(q[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) a[e] = k + e < K ? __ldg(row + k + e) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void load_act8(const T* row, i64 k, i64 K, bool vec, float (&a)[8]) {
  const u16* bits = reinterpret_cast<const u16*>(row);
  if (vec) {
    u32 q[4] = {0u, 0u, 0u, 0u};
    if (k < K) ld_v4(bits + k, q);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      T v;
      v.bits = static_cast<u16>(q[e >> 1] >> (16 * (e & 1)));
      a[e] = to_float(v);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      T v;
      v.bits = k + e < K ? __ldg(bits + k + e) : static_cast<u16>(0);
      a[e] = to_float(v);
    }
  }
}

// 2 * P 16-bit activations A[row][k .. k + 2P) as pairs: p[i] = A[k + 2i] | A[k + 2i + 1] << 16 (0 past K).
// vec: as for load_act8; k % 8 == 0; P % 4 == 0.
template <int P>
__device__ __forceinline__ void load_act_pairs(const u16* row, i64 k, i64 K, bool vec, u32 (&p)[P]) {
  if (vec) {
#pragma unroll
    for (int v = 0; v < P / 4; ++v) {
      u32 q[4] = {0u, 0u, 0u, 0u};
      if (k + 8 * v < K) ld_v4(row + k + 8 * v, q);
#pragma unroll
      for (int e = 0; e < 4; ++e) p[4 * v + e] = q[e];
    }
  } else {
#pragma unroll
    for (int i = 0; i < P; ++i) {
      const u32 lo = k + 2 * i < K ? __ldg(row + k + 2 * i) : 0u;
      const u32 hi = k + 2 * i + 1 < K ? __ldg(row + k + 2 * i + 1) : 0u;
      p[i] = lo | (hi << 16);
    }
  }
}

// Launch flags (bits of the `flags` kernel argument).
constexpr int kFlagCodesVec16 = 1;  // B rows can be read with 16-byte loads
constexpr int kFlagActVec16 = 2;    // A rows can be read with 16-byte loads

// ---------------------------------------------------------------------------------------------------------
// CUDA-core GEMV
// ---------------------------------------------------------------------------------------------------------

// Grid: x = ceil(N / (kWarps / k_split)) column groups, y = ceil(M / MT) row tiles; kThreads threads. Warp w of
// a CTA handles column blockIdx.x * (kWarps / k_split) + w / k_split and every k_split-th 512-byte stretch of
// its packed row, starting at stretch w % k_split. k_split is a power of two <= kWarps.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads)
    nf4_gemv_simt(const T* __restrict__ A, const u8* __restrict__ B, const float* absmax, const u8* absmax_codes,
                  const float* nested_absmax, const float* nested_code, const float* absmax_offset, const T* bias,
                  T* __restrict__ Y, int M, int K, int N, int block_shift, int k_blocks, int nested_shift, int k_split,
                  int flags) {
  __shared__ float partial[kWarps][MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cols_per_cta = kWarps / k_split;
  const i64 n = static_cast<i64>(blockIdx.x) * cols_per_cta + warp / k_split;  // i64: N may be near 2^31
  const int ks = warp % k_split;
  const int m0 = blockIdx.y * MT;
  const Scales sc = {absmax, absmax_codes, nested_absmax, nested_code, absmax_offset, nested_shift};
  const bool codes_vec = (flags & kFlagCodesVec16) != 0, act_vec = (flags & kFlagActVec16) != 0;
  // Lane l holds NF4[l % 16]; a shuffle by (code bits >> shift) reads NF4[code] (bit 4 of the index is
  // the next code's lowest bit, which the replication makes irrelevant).
  const float table = c_nf4[lane & 15];

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;

  if (n < N) {  // uniform over the warp
    const i64 row_bytes = static_cast<i64>(k_blocks) << (block_shift - 1);
    const int pieces = static_cast<int>((row_bytes + 15) >> 4);  // 16-byte pieces per row
    const u8* row = B + static_cast<i64>(n) * row_bytes;
    const i64 first_block = static_cast<i64>(n) * k_blocks;
    // The codes of the next stretch are loaded before the current one is decoded (two loads in flight).
    u32 next[4];
    load_codes(row, (static_cast<i64>(32 * ks) + lane) * 16, row_bytes, codes_vec, next);
    for (int base = 32 * ks; base < pieces; base += 32 * k_split) {  // uniform trip count
      const i64 piece = base + lane;
      const i64 off = piece * 16;
      const i64 k0 = piece * 32;  // first k of the piece
      u32 q[4] = {next[0], next[1], next[2], next[3]};
      load_codes(row, off + 16 * 32 * static_cast<i64>(k_split), row_bytes, codes_vec, next);
      // Scales of bytes 0..7 and 8..15 (different blocks only for block_size 16); 0 past the row.
      float s_lo = 0.0f, s_hi = 0.0f;
      if (off < row_bytes) {
        const i64 b = k0 >> block_shift;
        s_lo = block_scale(sc, first_block + b);
        s_hi = block_shift > 4 ? s_lo : (off + 8 < row_bytes ? block_scale(sc, first_block + b + 1) : 0.0f);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // word j: bytes 4j..4j+3, k = k0 + 8j .. k0 + 8j + 7
        const float s = j < 2 ? s_lo : s_hi;
        // The word's 8 weights (byte i: high nibble k0 + 8j + 2i, low nibble the next k), then per row 8
        // activations and 8 FMAs: few registers live at once for any MT (the float32 sums are those of one row
        // at a time either way).
        float w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w[2 * i] = __fmul_rn(__shfl_sync(kFullMask, table, static_cast<int>(q[j] >> (8 * i + 4))), s);
          w[2 * i + 1] = __fmul_rn(__shfl_sync(kFullMask, table, static_cast<int>(q[j] >> (8 * i))), s);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m0 + m < M) {  // uniform
            float a[8];
            load_act8(A + static_cast<i64>(m0 + m) * K, k0 + 8 * j, K, act_vec, a);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m] = fmaf(a[e], w[e], acc[m]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) acc[m] += __shfl_xor_sync(kFullMask, acc[m], d);
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m) partial[warp][m] = acc[m];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < cols_per_cta * MT; idx += kThreads) {
    const int c = idx % cols_per_cta, m = idx / cols_per_cta;  // consecutive threads: consecutive n
    const i64 nn = static_cast<i64>(blockIdx.x) * cols_per_cta + c;
    if (nn < N && m0 + m < M) {
      float y = 0.0f;
      for (int s = 0; s < k_split; ++s) y += partial[c * k_split + s][m];
      if (bias != nullptr) y += to_float(bias[nn]);
      Y[static_cast<i64>(m0 + m) * N + nn] = from_float<T>(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core GEMV / skinny GEMM
// ---------------------------------------------------------------------------------------------------------

// D[16 x 8] += A[16 x 16] * B[16 x 8], T inputs, float32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void mma16816(f16*, float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::mma_m16n8k16(false, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
__device__ __forceinline__ void mma16816(bf16*, float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::mma_m16n8k16(true, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Decodes the byte at bits [sh, sh + 8) of w (high nibble: even k, low nibble: odd k) into the hi and lo
// T-pairs of an mma A register (lower half: even k).
__device__ __forceinline__ void decode_byte(u32 table, u32 w, int sh, u32& hi, u32& lo) {
  const u32 even = __shfl_sync(kFullMask, table, static_cast<int>(w >> (sh + 4)));
  const u32 odd = __shfl_sync(kFullMask, table, static_cast<int>(w >> sh));
  hi = __byte_perm(even, odd, 0x5410);
  lo = __byte_perm(even, odd, 0x7632);
}

// Steps s in [S0, S0 + NS) of one 128-k chunk (see nf4_gemv_mma), for G lane groups of distinct blocks.
// Lane (g, t) supplies, in step s, the k-slots 2t, 2t+1 <- k0 + 4s + {0, 1} and 2t+8, 2t+9 <- k0 + 4s + {2, 3},
// k0 = kc + 32t: the codes are bytes 2s, 2s+1 of its 16 bytes, the activations pairs 2s, 2s+1 of its 32.
// Lanes with t >> (2 - log2 G) == gi share one block; the mma of group gi sees only their activations, so
// its product can be scaled by that block's scale (held by lane t = gi << gshift of the same g).
template <typename T, int NT8, int G, int S0, int NS>
__device__ __forceinline__ void mma_steps(u32 table, const u32 (&qa)[4], const u32 (&qb)[4], const u32 (&act)[NT8][16],
                                          float scale_a, float scale_b, int lane, float (&d)[NT8][4]) {
  constexpr int gshift = G == 1 ? 2 : (G == 2 ? 1 : 0);
  const int t = lane & 3;
  float c[G][NT8][4];
#pragma unroll
  for (int gi = 0; gi < G; ++gi)
#pragma unroll
    for (int j = 0; j < NT8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) c[gi][j][r] = 0.0f;

#pragma unroll
  for (int s = S0; s < S0 + NS; ++s) {
    const int sh = 16 * (s & 1);
    u32 w_hi[4], w_lo[4];
    decode_byte(table, qa[s >> 1], sh, w_hi[0], w_lo[0]);      // row g,     slots 2t, 2t+1
    decode_byte(table, qb[s >> 1], sh, w_hi[1], w_lo[1]);      // row g + 8, slots 2t, 2t+1
    decode_byte(table, qa[s >> 1], sh + 8, w_hi[2], w_lo[2]);  // row g,     slots 2t+8, 2t+9
    decode_byte(table, qb[s >> 1], sh + 8, w_hi[3], w_lo[3]);  // row g + 8, slots 2t+8, 2t+9
#pragma unroll
    for (int gi = 0; gi < G; ++gi) {
      const bool mine = (t >> gshift) == gi;
#pragma unroll
      for (int j = 0; j < NT8; ++j) {
        const u32 b0 = mine ? act[j][2 * s] : 0u, b1 = mine ? act[j][2 * s + 1] : 0u;
        mma16816(static_cast<T*>(nullptr), c[gi][j], w_hi, b0, b1);
        mma16816(static_cast<T*>(nullptr), c[gi][j], w_lo, b0, b1);
      }
    }
  }

#pragma unroll
  for (int gi = 0; gi < G; ++gi) {
    const int src = (lane & ~3) | (gi << gshift);
    const float sa = __shfl_sync(kFullMask, scale_a, src), sb = __shfl_sync(kFullMask, scale_b, src);
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
      d[j][0] = fmaf(sa, c[gi][j][0], d[j][0]);
      d[j][1] = fmaf(sa, c[gi][j][1], d[j][1]);
      d[j][2] = fmaf(sb, c[gi][j][2], d[j][2]);
      d[j][3] = fmaf(sb, c[gi][j][3], d[j][3]);
    }
  }
}

// Grid: x = ceil(ceil(N / 16) / (kWarps / k_split)) tile groups, y = ceil(M / MT) row tiles; kThreads threads.
// Warp w owns the 16 columns of tile blockIdx.x * (kWarps / k_split) + w / k_split and the chunks
// c = w % k_split (mod k_split) of 64 bytes (128 k) of their packed rows; lane (g = lane / 4, t = lane % 4)
// loads bytes [64c + 16t, +16) of rows n0 + g and n0 + g + 8 and the activations k0 = 128c + 32t .. k0 + 31
// of rows m0 + 8j + g. The mma computes D[n, m] with the columns of W as its rows; partial sums of the
// k_split warps are added in shared memory. T is f16 or bf16; MT is 8 or 16.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 2)
    nf4_gemv_mma(const T* __restrict__ A, const u8* __restrict__ B, const float* absmax, const u8* absmax_codes,
                 const float* nested_absmax, const float* nested_code, const float* absmax_offset, const T* bias,
                 T* __restrict__ Y, int M, int K, int N, int block_shift, int k_blocks, int nested_shift, int k_split,
                 int flags) {
  constexpr int NT8 = MT / 8;
  __shared__ float partial[kWarps][16][MT];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tiles_per_cta = kWarps / k_split;
  const i64 n0 = (static_cast<i64>(blockIdx.x) * tiles_per_cta + warp / k_split) * 16;  // i64: N may be near 2^31
  const int ks = warp % k_split;
  const int m0 = blockIdx.y * MT;
  const Scales sc = {absmax, absmax_codes, nested_absmax, nested_code, absmax_offset, nested_shift};
  const bool codes_vec = (flags & kFlagCodesVec16) != 0, act_vec = (flags & kFlagActVec16) != 0;
  const u32 table = split_pair<T>(c_nf4[lane & 15]);

  float d[NT8][4];
#pragma unroll
  for (int j = 0; j < NT8; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) d[j][r] = 0.0f;

  if (n0 < N) {  // uniform over the warp
    const i64 row_bytes = static_cast<i64>(k_blocks) << (block_shift - 1);
    const int chunks = static_cast<int>((row_bytes + 63) >> 6);
    const i64 na = n0 + g, nb = n0 + g + 8;
    const i64 bytes_a = na < N ? row_bytes : 0, bytes_b = nb < N ? row_bytes : 0;  // absent rows read as 0
    const u8* row_a = B + static_cast<i64>(na) * row_bytes;
    const u8* row_b = B + static_cast<i64>(nb) * row_bytes;
    const u16* act_rows[NT8];
    bool act_valid[NT8];
#pragma unroll
    for (int j = 0; j < NT8; ++j) {
      const int m = m0 + 8 * j + g;
      act_valid[j] = m < M;
      act_rows[j] = reinterpret_cast<const u16*>(A) + static_cast<i64>(m) * K;
    }
    // The codes of the next chunk are loaded before the current one is decoded (two loads in flight per row).
    u32 next_a[4], next_b[4];
    load_codes(row_a, static_cast<i64>(ks) * 64 + 16 * t, bytes_a, codes_vec, next_a);
    load_codes(row_b, static_cast<i64>(ks) * 64 + 16 * t, bytes_b, codes_vec, next_b);
    for (int c = ks; c < chunks; c += k_split) {  // uniform trip count
      const i64 off = static_cast<i64>(c) * 64 + 16 * t;
      const i64 k0 = static_cast<i64>(c) * 128 + 32 * t;
      const u32 qa[4] = {next_a[0], next_a[1], next_a[2], next_a[3]};
      const u32 qb[4] = {next_b[0], next_b[1], next_b[2], next_b[3]};
      load_codes(row_a, off + 64 * static_cast<i64>(k_split), bytes_a, codes_vec, next_a);
      load_codes(row_b, off + 64 * static_cast<i64>(k_split), bytes_b, codes_vec, next_b);
      u32 act[NT8][16];
#pragma unroll
      for (int j = 0; j < NT8; ++j) {
        if (act_valid[j]) {
          load_act_pairs(act_rows[j], k0, K, act_vec, act[j]);
        } else {
#pragma unroll
          for (int i = 0; i < 16; ++i) act[j][i] = 0u;
        }
      }
      // Scales of this lane's bytes 0..7 (lo) and 8..15 (hi) for rows a and b; 0 past a row.
      const i64 b = k0 >> block_shift;
      float sa_lo = 0.0f, sb_lo = 0.0f, sa_hi = 0.0f, sb_hi = 0.0f;
      if (off < bytes_a) sa_lo = block_scale(sc, static_cast<i64>(na) * k_blocks + b);
      if (off < bytes_b) sb_lo = block_scale(sc, static_cast<i64>(nb) * k_blocks + b);
      if (block_shift == 4) {
        if (off + 8 < bytes_a) sa_hi = block_scale(sc, static_cast<i64>(na) * k_blocks + b + 1);
        if (off + 8 < bytes_b) sb_hi = block_scale(sc, static_cast<i64>(nb) * k_blocks + b + 1);
      }
      switch (block_shift) {  // uniform
        case 4:
          mma_steps<T, NT8, 4, 0, 4>(table, qa, qb, act, sa_lo, sb_lo, lane, d);
          mma_steps<T, NT8, 4, 4, 4>(table, qa, qb, act, sa_hi, sb_hi, lane, d);
          break;
        case 5: mma_steps<T, NT8, 4, 0, 8>(table, qa, qb, act, sa_lo, sb_lo, lane, d); break;
        case 6: mma_steps<T, NT8, 2, 0, 8>(table, qa, qb, act, sa_lo, sb_lo, lane, d); break;
        default: mma_steps<T, NT8, 1, 0, 8>(table, qa, qb, act, sa_lo, sb_lo, lane, d); break;
      }
    }
  }

  // D fragment: d[j][0..1] = rows g, columns 8j + 2t + {0, 1}; d[j][2..3] = row g + 8, same columns.
#pragma unroll
  for (int j = 0; j < NT8; ++j) {
    partial[warp][g][8 * j + 2 * t] = d[j][0];
    partial[warp][g][8 * j + 2 * t + 1] = d[j][1];
    partial[warp][g + 8][8 * j + 2 * t] = d[j][2];
    partial[warp][g + 8][8 * j + 2 * t + 1] = d[j][3];
  }
  __syncthreads();
  const int cols = 16 * tiles_per_cta;
  for (int idx = threadIdx.x; idx < cols * MT; idx += kThreads) {
    const int c = idx % cols, m = idx / cols;  // consecutive threads: consecutive n
    const i64 n = static_cast<i64>(blockIdx.x) * cols + c;
    if (n < N && m0 + m < M) {
      const int tile = c >> 4, r = c & 15;
      float y = 0.0f;
      for (int s = 0; s < k_split; ++s) y += partial[tile * k_split + s][r][m];
      if (bias != nullptr) y += to_float(bias[n]);
      Y[static_cast<i64>(m0 + m) * N + n] = from_float<T>(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core GEMM for large M
// ---------------------------------------------------------------------------------------------------------

constexpr int kTileN = 128;        // output columns per CTA (rows of the mma)
constexpr int kTileM = 64;         // activation rows per CTA
constexpr int kTileK = 64;         // k per stage
constexpr int kLd = kTileK + 8;    // shared row length in 16-bit elements (144 bytes: conflict-free ldmatrix)
constexpr int kMaxTileBlocks = 4;  // absmax blocks per stage (block_size 16)

struct alignas(16) U32x4 {
  u32 x, y, z, w;
};

__device__ __forceinline__ u32 shared_address(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// Four 8x8 matrices of 16-bit elements; lane l addresses one row of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* row) {
#ifdef ONNX_NF4_CUDA_EMU
  cuda_emu::ptx::ldmatrix_x4(r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
#endif
}

// Grid: x = ceil(N / kTileN), y = ceil(M / kTileM); kThreads threads (k_split must be 1). Per stage of kTileK k,
// the CTA decodes a 128 x 64 tile of codes into shared memory as the two-term split of NF4 (hi and lo, in T; the
// scale is not applied) and stages 64 x 64 activations; warp w computes columns 32 (w % 4) .. + 31 x rows
// 32 (w / 4) .. + 31 with mma.m16n8k16 (ldmatrix operands). Every 16-k step lies in one absmax block, so the
// float32 products of a block are summed apart and scaled once when the block ends.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    nf4_gemm_mma(const T* __restrict__ A, const u8* __restrict__ B, const float* absmax, const u8* absmax_codes,
                 const float* nested_absmax, const float* nested_code, const float* absmax_offset, const T* bias,
                 T* __restrict__ Y, int M, int K, int N, int block_shift, int k_blocks, int nested_shift, int k_split,
                 int flags) {
  static_assert(sizeof(T) == 2, "16-bit activations only");
  __shared__ __align__(16) u16 s_whi[kTileN][kLd];
  __shared__ __align__(16) u16 s_wlo[kTileN][kLd];
  __shared__ __align__(16) u16 s_act[kTileM][kLd];
  __shared__ float s_scale[kTileN][kMaxTileBlocks];
  (void)k_split;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const i64 n_base = static_cast<i64>(blockIdx.x) * kTileN;  // i64: N may be near 2^31
  const int m_base = blockIdx.y * kTileM;
  const int wn = 32 * (warp & 3), wm = 32 * (warp >> 2);
  const Scales sc = {absmax, absmax_codes, nested_absmax, nested_code, absmax_offset, nested_shift};
  const bool codes_vec = (flags & kFlagCodesVec16) != 0, act_vec = (flags & kFlagActVec16) != 0;
  const u32 table = split_pair<T>(c_nf4[lane & 15]);

  // Staging roles: codes of column n_base + (tid / 2), bytes 16 (tid % 2) .. + 15 of the stage;
  // activations of row m_base + tid / 4, k 16 (tid % 4) .. + 15 of the stage.
  const int w_row = tid >> 1, w_half = tid & 1;
  const i64 n_w = n_base + w_row;
  const i64 row_bytes = static_cast<i64>(k_blocks) << (block_shift - 1);
  const i64 w_bytes = n_w < N ? row_bytes : 0;  // absent columns read as 0
  const u8* w_ptr = B + static_cast<i64>(n_w) * row_bytes;
  const int a_row = tid >> 2, a_quarter = tid & 3;
  const bool a_valid = m_base + a_row < M;
  const u16* a_ptr = reinterpret_cast<const u16*>(A) + static_cast<i64>(m_base + a_row) * K;

  const int stages = (K - 1) / kTileK + 1;  // K >= 1; no overflow near 2^31. k past K adds nothing (A reads as 0)
  const int last_step = 4 * stages - 1;

  u32 codes[4], acts[8];
  float s_lo = 0.0f, s_hi = 0.0f;
  auto load_stage = [&](int st) {
    const i64 off = static_cast<i64>(st) * (kTileK / 2) + 16 * w_half;
    load_codes(w_ptr, off, w_bytes, codes_vec, codes);
    s_lo = s_hi = 0.0f;
    if (off < w_bytes) {
      const i64 f = static_cast<i64>(n_w) * k_blocks + ((2 * off) >> block_shift);
      s_lo = block_scale(sc, f);
      s_hi = block_shift > 4 ? s_lo : (off + 8 < w_bytes ? block_scale(sc, f + 1) : 0.0f);
    }
    if (a_valid) {
      load_act_pairs(a_ptr, static_cast<i64>(st) * kTileK + 16 * a_quarter, K, act_vec, acts);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) acts[i] = 0u;
    }
  };

  float d[2][4][4], c[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) d[i][j][r] = c[i][j][r] = 0.0f;

  load_stage(0);
  for (int st = 0; st < stages; ++st) {
    __syncthreads();  // the previous stage is consumed
    {
      U32x4 hi[4], lo[4];
      u32* hw = &hi[0].x;
      u32* lw = &lo[0].x;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) decode_byte(table, codes[j], 8 * i, hw[4 * j + i], lw[4 * j + i]);
      U32x4* dst_hi = reinterpret_cast<U32x4*>(&s_whi[w_row][32 * w_half]);
      U32x4* dst_lo = reinterpret_cast<U32x4*>(&s_wlo[w_row][32 * w_half]);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        dst_hi[v] = hi[v];
        dst_lo[v] = lo[v];
      }
      U32x4* dst_a = reinterpret_cast<U32x4*>(&s_act[a_row][16 * a_quarter]);
      dst_a[0] = U32x4{acts[0], acts[1], acts[2], acts[3]};
      dst_a[1] = U32x4{acts[4], acts[5], acts[6], acts[7]};
      // Stage-local block of this thread's first code (block_size <= 64: stages start on block boundaries).
      s_scale[w_row][(32 * w_half) >> block_shift] = s_lo;
      if (block_shift == 4) s_scale[w_row][2 * w_half + 1] = s_hi;
    }
    __syncthreads();
    if (st + 1 < stages) load_stage(st + 1);  // in flight during the mmas

#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const int kk = 16 * ks;
      u32 a_hi[2][4], a_lo[2][4], b[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldmatrix_x4(a_hi[i], &s_whi[wn + 16 * i + (lane & 15)][kk + 8 * (lane >> 4)]);
        ldmatrix_x4(a_lo[i], &s_wlo[wn + 16 * i + (lane & 15)][kk + 8 * (lane >> 4)]);
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        ldmatrix_x4(b[p], &s_act[wm + 16 * p + (lane & 7) + ((lane >> 4) << 3)][kk + 8 * ((lane >> 3) & 1)]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const u32 b0 = b[j >> 1][2 * (j & 1)], b1 = b[j >> 1][2 * (j & 1) + 1];
          mma16816(static_cast<T*>(nullptr), c[i][j], a_hi[i], b0, b1);
          mma16816(static_cast<T*>(nullptr), c[i][j], a_lo[i], b0, b1);
        }
      const int step = 4 * st + ks;
      // Uniform: the block ends after 16 (step + 1) k (written without the product, which overflows near K = 2^31).
      if (((step + 1) & ((1 << (block_shift - 4)) - 1)) == 0 || step == last_step) {
        const int lb = kk >> block_shift;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float sa = s_scale[wn + 16 * i + g][lb], sb = s_scale[wn + 16 * i + g + 8][lb];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            d[i][j][0] = fmaf(sa, c[i][j][0], d[i][j][0]);
            d[i][j][1] = fmaf(sa, c[i][j][1], d[i][j][1]);
            d[i][j][2] = fmaf(sb, c[i][j][2], d[i][j][2]);
            d[i][j][3] = fmaf(sb, c[i][j][3], d[i][j][3]);
#pragma unroll
            for (int r = 0; r < 4; ++r) c[i][j][r] = 0.0f;
          }
        }
      }
    }
  }

  // d[i][j]: columns n = n_base + wn + 16i + g (+ 8 for r >= 2), rows m = m_base + wm + 8j + 2t (+ 1 for odd r).
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const i64 n = n_base + wn + 16 * i + g + 8 * (r >> 1);
      if (n >= N) continue;
      const float bn = bias != nullptr ? to_float(bias[n]) : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = m_base + wm + 8 * j + 2 * t + (r & 1);
        if (m < M) Y[static_cast<i64>(m) * N + n] = from_float<T>(d[i][j][r] + bn);
      }
    }
}

#ifndef __CUDACC_RTC__
// ---------------------------------------------------------------------------------------------------------
// Host launcher (nvcc and emulation builds; onnx_nf4/op/cupy_backend.py mirrors the configuration logic)
// ---------------------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kSkinnyMaxRows = 32;  // 16-bit A with more rows runs nf4_gemm_mma

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int Log2(int64_t v) {
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

bool Aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Warps per output unit (column or 16-column tile): the smallest power of two <= kWarps that gives about
// 16 warps per SM, and no more than the unit's stretches of work.
int KSplit(int64_t units, int64_t row_tiles, int64_t stretches, int sm_count) {
  const int64_t target = int64_t{16} * sm_count;
  int ks = 1;
  while (ks < kWarps && units * row_tiles * ks < target && 2 * ks <= stretches) ks *= 2;
  return ks;
}

// The arguments of one launch, in kernel order.
template <typename T>
struct LaunchArgs {
  const T* a;
  const Problem* p;
  T* y;
  int m;
  int block_shift;
  int k_blocks;
  int nested_shift;
  int k_split;
  int flags;
};

#ifdef ONNX_NF4_CUDA_EMU  // custom_ops/cuda/emu: the kernel runs on the CPU, now
#define ONNX_NF4_LAUNCH(kernel, grid, block, stream) cuda_emu::MakeLaunch(kernel, grid, block, stream)
#else
#define ONNX_NF4_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

template <typename T, typename KernelFn>
void Run(KernelFn kernel, dim3 grid, cudaStream_t stream, const LaunchArgs<T>& x) {
  const Problem& p = *x.p;
  ONNX_NF4_LAUNCH(kernel, grid, kThreads, stream)(x.a, p.B, p.absmax, p.absmax_codes, p.nested_absmax, p.nested_code,
                                                  p.absmax_offset, static_cast<const T*>(p.bias), x.y, x.m,
                                                  static_cast<int>(p.K), static_cast<int>(p.N), x.block_shift,
                                                  x.k_blocks, x.nested_shift, x.k_split, x.flags);
}

template <typename T>
std::string LaunchTyped(const Problem& p, bool mma, cudaStream_t stream, int sm_count) {
  const int block_shift = Log2(p.block_size);
  const int nested_shift = p.absmax_codes != nullptr ? Log2(p.nested_block_size) : 0;
  const int64_t k_blocks = (p.K + p.block_size - 1) / p.block_size;
  const int64_t row_bytes = k_blocks * p.block_size / 2;
  const int64_t elems_per_16 = 16 / static_cast<int64_t>(sizeof(T));
  int flags = 0;
  if (row_bytes % 16 == 0 && Aligned(p.B, 16)) flags |= kFlagCodesVec16;
  if (p.K % elems_per_16 == 0 && Aligned(p.A, 16)) flags |= kFlagActVec16;

  // Kernel and row tile (template MT) for this M. mma rows above kSkinnyMaxRows use the CTA-tiled kernel.
  const bool tiled = mma && p.M > kSkinnyMaxRows;
  int mt;
  if (tiled) {
    mt = kTileM;
  } else if (mma) {
    mt = p.M <= 8 ? 8 : 16;
  } else {
    mt = p.M <= 1 ? 1 : (p.M <= 2 ? 2 : (p.M <= 4 ? 4 : 8));
  }
  int k_split = 1;
  int64_t grid_x = (p.N + kTileN - 1) / kTileN;
  if (!tiled) {
    const int64_t units = mma ? (p.N + 15) / 16 : p.N;
    const int64_t stretches = mma ? (row_bytes + 63) / 64 : ((row_bytes + 15) / 16 + 31) / 32;
    k_split = KSplit(units, (p.M + mt - 1) / mt, stretches, sm_count);
    const int64_t units_per_cta = kWarps / k_split;
    grid_x = (units + units_per_cta - 1) / units_per_cta;
  }
  if (grid_x > 0x7fffffff) return "N is too large for one grid";

  constexpr int64_t kMaxRowTiles = 65535;  // gridDim.y limit: larger M is split into several launches
  const char* a = static_cast<const char*>(p.A);
  char* y = static_cast<char*>(p.Y);
  for (int64_t row = 0; row < p.M;) {
    const int64_t tiles = std::min<int64_t>(kMaxRowTiles, (p.M - row + mt - 1) / mt);
    const int64_t rows = std::min<int64_t>(tiles * mt, p.M - row);
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(tiles));
    const void* a_part = a + row * p.K * static_cast<int64_t>(sizeof(T));
    void* y_part = y + row * p.N * static_cast<int64_t>(sizeof(T));
    const LaunchArgs<T> x = {static_cast<const T*>(a_part),
                             &p,
                             static_cast<T*>(y_part),
                             static_cast<int>(rows),
                             block_shift,
                             static_cast<int>(k_blocks),
                             nested_shift,
                             k_split,
                             flags};
    if constexpr (sizeof(T) == 2) {
      if (tiled) {
        Run(nf4_gemm_mma<T>, grid, stream, x);
        row += rows;
        continue;
      }
      if (mma) {
        if (mt == 8) {
          Run(nf4_gemv_mma<T, 8>, grid, stream, x);
        } else {
          Run(nf4_gemv_mma<T, 16>, grid, stream, x);
        }
        row += rows;
        continue;
      }
    }
    switch (mt) {
      case 1: Run(nf4_gemv_simt<T, 1>, grid, stream, x); break;
      case 2: Run(nf4_gemv_simt<T, 2>, grid, stream, x); break;
      case 4: Run(nf4_gemv_simt<T, 4>, grid, stream, x); break;
      default: Run(nf4_gemv_simt<T, 8>, grid, stream, x); break;
    }
    row += rows;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("CUDA kernel launch failed: ") + cudaGetErrorString(err);
  return "";
}

}  // namespace

std::string LaunchMatMulNF4(const Problem& p, Algo algo, void* stream_ptr) {
  if (p.M < 0) return "M must be >= 0";
  if (p.K < 1 || p.K > 0x7fffffff || p.N < 1 || p.N > 0x7fffffff) return "K and N must be in [1, 2^31 - 1]";
  if (!IsPowerOfTwo(p.block_size) || p.block_size < 16 || p.block_size > 4096) {
    return "block_size must be a power of two in [16, 4096]";
  }
  const bool dq = p.absmax_codes != nullptr;
  if (dq == (p.absmax != nullptr)) return "exactly one of absmax (float32) and absmax codes (uint8) must be given";
  if (dq && (p.nested_absmax == nullptr || p.nested_code == nullptr || p.absmax_offset == nullptr)) {
    return "double-quantized absmax needs nested_absmax, nested_code and absmax_offset";
  }
  if (dq && (!IsPowerOfTwo(p.nested_block_size) || p.nested_block_size < 16)) {
    return "nested_block_size must be a power of two >= 16";
  }
  if (p.M == 0) return "";
  if (p.A == nullptr || p.B == nullptr || p.Y == nullptr) return "A, B and Y must be device pointers";
  if (!Aligned(p.B, 8)) return "B must be 8-byte aligned";
  const size_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  if (!Aligned(p.A, elem) || !Aligned(p.Y, elem) || (p.bias != nullptr && !Aligned(p.bias, elem)) ||
      (p.absmax != nullptr && !Aligned(p.absmax, 4))) {
    return "A, Y, bias and absmax must be aligned to their element size";
  }
  bool mma;
  switch (algo) {
    case Algo::kAuto: mma = p.dtype != DType::kFloat32; break;
    case Algo::kSimt: mma = false; break;
    case Algo::kMma:
      if (p.dtype == DType::kFloat32) return "the tensor-core kernel takes float16 or bfloat16 A only";
      mma = true;
      break;
    default: return "unknown algorithm";
  }

  int device = 0, sm_count = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return std::string("CUDA device query failed: ") + cudaGetErrorString(err);

  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.dtype) {
    case DType::kFloat32: return LaunchTyped<float>(p, mma, stream, sm_count);
    case DType::kFloat16: return LaunchTyped<f16>(p, mma, stream, sm_count);
    case DType::kBFloat16: return LaunchTyped<bf16>(p, mma, stream, sm_count);
  }
  return "unknown element type";
}
#endif  // __CUDACC_RTC__

}  // namespace gpu
}  // namespace onnx_nf4
