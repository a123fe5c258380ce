// kernels_i8_avx2vnni.cc: the AVX2 + AVX-VNNI kernel set: accuracy_level 4 with vpdpbusd on 256-bit vectors
// (the VEX encoding of CPUs that have AVX-VNNI without AVX-512, e.g. Intel Alder Lake and later), float32 from
// the AVX2 set. Built with -mavx2 -mfma -mavxvnni; only called when the CPU has them (cpu_common.cc).
#include "cpu_kernels.h"
#include "simd_i8_kernels.h"
#include "simd_i8_ymm.h"

namespace onnx_nf4::cpu {
namespace {

void MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.w.block_size % 64 == 0) {
    I8MatMul<I8Ymm<true, 64>>(p, par, scratch);
  } else {  // blocks of 16 or 32 codes
    I8MatMul<I8Ymm<true, 32>>(p, par, scratch);
  }
}

}  // namespace

const KernelSet& Avx2VnniKernels() {
  static const KernelSet set{"avx2vnni", Avx2Kernels().matmul_f32, MatMulInt8};
  return set;
}

}  // namespace onnx_nf4::cpu
