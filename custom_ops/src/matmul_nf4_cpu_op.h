// matmul_nf4_cpu_op.h: the CPU execution provider's MatMulNF4 custom op (float32, float16 and bfloat16 A).
#ifndef ONNX_NF4_MATMUL_NF4_CPU_OP_H_
#define ONNX_NF4_MATMUL_NF4_CPU_OP_H_

#include "ort_api.h"

namespace onnx_nf4 {

// Adds the CPU MatMulNF4 ops (one per activation type) to domain. They live as long as the process.
void RegisterCpuOps(Ort::CustomOpDomain& domain);

}  // namespace onnx_nf4

#endif  // ONNX_NF4_MATMUL_NF4_CPU_OP_H_
