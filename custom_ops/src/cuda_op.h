// cuda_op.h: the CUDA execution provider's MatMulNF4 custom op (float32, float16 and bfloat16 A).
#ifndef ONNX_NF4_CUDA_OP_H_
#define ONNX_NF4_CUDA_OP_H_

#include "ort_api.h"

namespace onnx_nf4 {

// Adds the CUDA MatMulNF4 ops (one per activation type) to domain. They live as long as the process.
void RegisterCudaOps(Ort::CustomOpDomain& domain);

}  // namespace onnx_nf4

#endif  // ONNX_NF4_CUDA_OP_H_
