// kernels_i8_avx2.cc: accuracy_level 4 on AVX2 (vpmaddubsw + vpmaddwd). Built with -mavx2 -mfma; only called when
// the CPU has them (cpu_common.cc). docs/cpu_kernel.md explains the algorithms.
#include "cpu_kernels.h"
#include "simd_i8_kernels.h"
#include "simd_i8_ymm.h"

namespace onnx_nf4::cpu {

void Avx2MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.w.block_size % 64 == 0) {
    I8MatMul<I8Ymm<false, 64>>(p, par, scratch);
  } else {  // blocks of 16 or 32 codes
    I8MatMul<I8Ymm<false, 32>>(p, par, scratch);
  }
}

}  // namespace onnx_nf4::cpu
