// matmul_nf4_args.h: attribute and input validation of onnx_nf4::MatMulNF4 (docs/MatMulNF4.md), shared by
// every execution provider's kernel.
//
// Both functions only read metadata (attributes, element types, shapes); no tensor data is touched, so a
// kernel that calls them before reading anything never reads out of bounds, whatever the model holds.
// Failures throw Ort::Exception(ORT_INVALID_ARGUMENT / ORT_INVALID_GRAPH) with a message that starts with
// "MatMulNF4 node '<name>': " and names the mismatch.
#ifndef ONNX_NF4_MATMUL_NF4_ARGS_H_
#define ONNX_NF4_MATMUL_NF4_ARGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ort_api.h"

namespace onnx_nf4 {

// Input indices of MatMulNF4.
enum MatMulNF4Input : size_t {
  kInputA = 0,
  kInputB = 1,
  kInputAbsmax = 2,
  kInputNestedAbsmax = 3,
  kInputNestedCode = 4,
  kInputAbsmaxOffset = 5,
  kInputBias = 6,
  kNumInputs = 7,
};

// The attributes of one MatMulNF4 node, validated.
struct MatMulNF4Attrs {
  std::string node_name;
  int64_t K = 0;                    // reduction size, >= 1
  int64_t N = 0;                    // output features, >= 1
  int64_t block_size = 0;           // power of two in [16, 4096]
  int64_t nested_block_size = 256;  // power of two >= 16
  int64_t accuracy_level = 0;       // in [0, 4]
  int64_t k_blocks = 0;             // ceil(K / block_size)
};

// Sizes of one MatMulNF4 call, derived from the attributes and the input metadata (all checked).
struct MatMulNF4Shapes {
  ONNXTensorElementDataType a_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float, float16 or bfloat16
  int64_t M = 0;                 // rows of A: product of its leading dimensions (0 for an empty A)
  std::vector<int64_t> y_shape;  // leading dimensions of A, then N
  bool double_quant = false;     // absmax is uint8 and inputs 3..5 are present
  bool has_bias = false;         // input 6 is present
  int64_t nested_blocks = 0;     // ceil(N * k_blocks / nested_block_size) when double_quant, else 0
};

// Reads and validates the attributes of a MatMulNF4 node (K, N, block_size required; nested_block_size and
// accuracy_level optional). Also checks that N * k_blocks * block_size fits in int64 and size_t.
MatMulNF4Attrs ReadMatMulNF4Attrs(const Ort::ConstKernelInfo& info);

// Validates the inputs of one call against the attributes: element types, ranks, every dimension, the
// presence rules of the optional inputs. Reads no tensor data.
MatMulNF4Shapes ValidateMatMulNF4Inputs(const MatMulNF4Attrs& attrs, const Ort::KernelContext& ctx);

// Throws Ort::Exception(code) with "MatMulNF4 node '<node_name>': <message>".
[[noreturn]] void ThrowMatMulNF4Error(const std::string& node_name, const std::string& message,
                                      OrtErrorCode code = ORT_INVALID_ARGUMENT);

}  // namespace onnx_nf4

#endif  // ONNX_NF4_MATMUL_NF4_ARGS_H_
