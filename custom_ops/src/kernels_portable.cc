// kernels_portable.cc: plain C++ kernels for CPUs without AVX2 (and the reference for the SIMD modules).
//
// float32: each task walks a few columns block by block, decodes the exact float32 weights of one block
// (rule 2 of the spec) into a stack buffer and dots them with every row of A.
// int8: A quantized per (row, block); per block an integer dot product with round(NF4 * 127).
#include <algorithm>

#include "cpu_kernels.h"

namespace onnx_nf4::cpu {
namespace {

constexpr int64_t kColsPerTask = 8;

// Columns [8 * task, 8 * task + 8): per block, the exact weights go to a stack buffer and are dotted with
// every row of A; Y holds the running sums.
void F32Columns(void* data, size_t task) {
  const Problem& p = *static_cast<const Problem*>(data);
  const Nf4Weight& w = p.w;
  const int64_t K = w.K, N = w.N, bs = w.block_size;
  const int64_t n0 = static_cast<int64_t>(task) * kColsPerTask;
  const int64_t n1 = std::min(n0 + kColsPerTask, N);
  float wblk[4096];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = w.packed + n * w.k_blocks * (bs / 2);
    for (int64_t m = 0; m < p.M; ++m) p.Y[m * N + n] = p.bias != nullptr ? p.bias[n] : 0.0f;
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      const float s = BlockScale(w, n, b);
      const int64_t k0 = b * bs;
      const int64_t len = std::min(bs, K - k0);
      for (int64_t j = 0; j < len; ++j) {
        const uint8_t byte = codes[(k0 + j) / 2];
        wblk[j] = kNF4[(j & 1) ? (byte & 0xF) : (byte >> 4)] * s;
      }
      for (int64_t m = 0; m < p.M; ++m) {
        const float* a = p.A + m * K + k0;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t j = 0;
        for (; j + 4 <= len; j += 4) {
          for (int i = 0; i < 4; ++i) acc[i] += a[j + i] * wblk[j + i];
        }
        for (; j < len; ++j) acc[0] += a[j] * wblk[j];
        p.Y[m * N + n] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
      }
    }
  }
}

void MatMulF32(const Problem& p, const ParallelRunner& par, Scratch& /*scratch*/) {
  par.For(static_cast<size_t>(CeilDiv(p.w.N, kColsPerTask)), p.M * p.w.N * p.w.K, F32Columns, const_cast<Problem*>(&p));
}

void Int8Columns(void* data, size_t task) {
  const Int8Activations& t = *static_cast<const Int8Activations*>(data);
  const Problem& p = *t.p;
  const Nf4Weight& w = p.w;
  const int64_t bs = w.block_size, kb = w.k_blocks, kpad = t.kpad;
  const int64_t n0 = static_cast<int64_t>(task) * kColsPerTask;
  const int64_t n1 = std::min(n0 + kColsPerTask, w.N);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* codes = w.packed + n * kb * (bs / 2);
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* qa = t.qa + m * kpad;
      const float* as = t.ascale + m * kb;
      float y = 0.0f;
      for (int64_t b = 0; b < kb; ++b) {
        int32_t dot = 0;
        const uint8_t* c = codes + b * (bs / 2);
        const int8_t* q = qa + b * bs;
        for (int64_t j = 0; j < bs / 2; ++j) {
          dot += kNF4I8[c[j] >> 4] * q[2 * j] + kNF4I8[c[j] & 0xF] * q[2 * j + 1];
        }
        y += static_cast<float>(dot) * (BlockScale(w, n, b) * as[b]);
      }
      y *= 1.0f / kInt8Levels;
      if (p.bias != nullptr) y += p.bias[n];
      p.Y[m * w.N + n] = y;
    }
  }
}

void MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  // Natural order (group 2); the signed table needs no per-block sums.
  Int8Activations t = QuantizeActivationsInt8(p, 2, false, scratch);
  par.For(static_cast<size_t>(CeilDiv(p.w.N, kColsPerTask)), p.M * p.w.N * p.w.K, Int8Columns, &t);
}

}  // namespace

const KernelSet& PortableKernels() {
  static const KernelSet set{"portable", MatMulF32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
