// cpu_isa.h: the instruction-set cap ONNX_NF4_CPU_ISA sets for every CPU code path (MatMulNF4 kernels, NF4 encoder).
#ifndef ONNX_NF4_CPU_ISA_H_
#define ONNX_NF4_CPU_ISA_H_

namespace onnx_nf4::cpu {

// Instruction-set levels, ascending: each one's code runs wherever the next one's does.
enum class IsaLevel { kPortable = 0, kAvx2 = 1, kAvx2Vnni = 2, kAvx512 = 3 };

// The highest level ONNX_NF4_CPU_ISA=portable|avx2|avx2vnni|avx512 allows (for tests and benchmarks); kAvx512, i.e.
// no cap, when it is unset or names no level. A code path picks the best level at or below it that the CPU runs.
IsaLevel IsaCap();

}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_CPU_ISA_H_
