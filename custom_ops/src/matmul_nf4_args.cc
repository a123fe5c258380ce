// matmul_nf4_args.cc: see matmul_nf4_args.h.
#include "matmul_nf4_args.h"

#include <limits>
#include <sstream>

namespace onnx_nf4 {
namespace {

constexpr int64_t kMinBlockSize = 16;
constexpr int64_t kMaxBlockSize = 4096;
constexpr int64_t kMinNestedBlockSize = 16;
constexpr int64_t kNestedCodeSize = 256;
// K and N are bounded so that every derived size (N * K_pad, M * K, ...) is far from overflowing int64.
constexpr int64_t kMaxDim = int64_t{1} << 31;

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "double";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
  }
}

// Reads an int attribute; returns false when it is absent (or not an int).
bool TryGetInt(const Ort::ConstKernelInfo& info, const char* name, int64_t* out) {
  OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, out);
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

struct InputMeta {
  bool present = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
};

InputMeta GetInputMeta(const Ort::KernelContext& ctx, size_t index) {
  InputMeta meta;
  if (index >= ctx.GetInputCount()) return meta;
  Ort::ConstValue value = ctx.GetInput(index);
  if (static_cast<const OrtValue*>(value) == nullptr) return meta;
  if (!value.IsTensor()) return meta;
  Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
  meta.present = true;
  meta.type = info.GetElementType();
  meta.shape = info.GetShape();
  return meta;
}

}  // namespace

void ThrowMatMulNF4Error(const std::string& node_name, const std::string& message, OrtErrorCode code) {
  throw Ort::Exception("MatMulNF4 node '" + node_name + "': " + message, code);
}

MatMulNF4Attrs ReadMatMulNF4Attrs(const Ort::ConstKernelInfo& info) {
  MatMulNF4Attrs a;
  a.node_name = info.GetNodeName();
  auto fail = [&](const std::string& msg) { ThrowMatMulNF4Error(a.node_name, msg, ORT_INVALID_GRAPH); };
  for (auto [name, dst] : {std::pair<const char*, int64_t*>{"K", &a.K}, {"N", &a.N}, {"block_size", &a.block_size}}) {
    if (!TryGetInt(info, name, dst)) fail(std::string("missing required int attribute '") + name + "'");
  }
  TryGetInt(info, "nested_block_size", &a.nested_block_size);
  TryGetInt(info, "accuracy_level", &a.accuracy_level);
  if (a.K < 1 || a.K > kMaxDim) fail("attribute K must be in [1, 2^31], got " + std::to_string(a.K));
  if (a.N < 1 || a.N > kMaxDim) fail("attribute N must be in [1, 2^31], got " + std::to_string(a.N));
  if (!IsPowerOfTwo(a.block_size) || a.block_size < kMinBlockSize || a.block_size > kMaxBlockSize) {
    fail("attribute block_size must be a power of two in [16, 4096], got " + std::to_string(a.block_size));
  }
  if (!IsPowerOfTwo(a.nested_block_size) || a.nested_block_size < kMinNestedBlockSize) {
    fail("attribute nested_block_size must be a power of two >= 16, got " + std::to_string(a.nested_block_size));
  }
  if (a.accuracy_level < 0 || a.accuracy_level > 4) {
    fail("attribute accuracy_level must be in [0, 4], got " + std::to_string(a.accuracy_level));
  }
  a.k_blocks = (a.K + a.block_size - 1) / a.block_size;
  // N * K_pad <= 2^31 * (2^31 + 4096): below 2^63, so every later product of weight sizes is safe.
  return a;
}

MatMulNF4Shapes ValidateMatMulNF4Inputs(const MatMulNF4Attrs& attrs, const Ort::KernelContext& ctx) {
  auto fail = [&](const std::string& msg) { ThrowMatMulNF4Error(attrs.node_name, msg); };
  MatMulNF4Shapes s;
  const int64_t K = attrs.K, N = attrs.N, kb = attrs.k_blocks, bs = attrs.block_size;

  const InputMeta a = GetInputMeta(ctx, kInputA);
  if (!a.present) fail("input A is missing");
  if (a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      a.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    fail(std::string("input A must be float, float16 or bfloat16, got ") + TypeName(a.type));
  }
  if (a.shape.empty()) fail("input A must have rank >= 1, got a scalar");
  if (a.shape.back() != K) {
    fail("input A has last dimension " + std::to_string(a.shape.back()) + " (shape " + ShapeString(a.shape) +
         ") but attribute K is " + std::to_string(K));
  }
  s.a_type = a.type;
  s.M = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) {
    if (a.shape[i] < 0) fail("input A has a negative dimension: " + ShapeString(a.shape));
    s.M *= a.shape[i];  // bounded: onnxruntime allocated M * K elements
  }
  s.y_shape.assign(a.shape.begin(), a.shape.end() - 1);
  s.y_shape.push_back(N);

  const InputMeta b = GetInputMeta(ctx, kInputB);
  if (!b.present) fail("input B is missing");
  if (b.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
    fail(std::string("input B must be uint8, got ") + TypeName(b.type));
  const std::vector<int64_t> b_expected{N, kb, bs / 2};
  if (b.shape != b_expected) {
    fail("input B has shape " + ShapeString(b.shape) +
         ", expected [N, k_blocks, block_size / 2] = " + ShapeString(b_expected));
  }

  const InputMeta absmax = GetInputMeta(ctx, kInputAbsmax);
  if (!absmax.present) fail("input absmax is missing");
  if (absmax.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && absmax.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    fail(std::string("input absmax must be float or uint8, got ") + TypeName(absmax.type));
  }
  const std::vector<int64_t> absmax_expected{N, kb};
  if (absmax.shape != absmax_expected) {
    fail("input absmax has shape " + ShapeString(absmax.shape) +
         ", expected [N, k_blocks] = " + ShapeString(absmax_expected));
  }

  const InputMeta nested_absmax = GetInputMeta(ctx, kInputNestedAbsmax);
  const InputMeta nested_code = GetInputMeta(ctx, kInputNestedCode);
  const InputMeta offset = GetInputMeta(ctx, kInputAbsmaxOffset);
  s.double_quant = absmax.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  if (s.double_quant) {
    if (!nested_absmax.present || !nested_code.present || !offset.present) {
      fail("absmax is uint8 (double quantization) but nested_absmax, nested_code and absmax_offset are not all given");
    }
    s.nested_blocks = (N * kb + attrs.nested_block_size - 1) / attrs.nested_block_size;
    auto check_f32 = [&](const InputMeta& m, const char* name, const std::vector<int64_t>& expected) {
      if (m.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        fail(std::string("input ") + name + " must be float, got " + TypeName(m.type));
      }
      if (m.shape != expected) {
        fail(std::string("input ") + name + " has shape " + ShapeString(m.shape) + ", expected " +
             ShapeString(expected));
      }
    };
    check_f32(nested_absmax, "nested_absmax", {s.nested_blocks});
    check_f32(nested_code, "nested_code", {kNestedCodeSize});
    check_f32(offset, "absmax_offset", offset.shape.empty() ? std::vector<int64_t>{} : std::vector<int64_t>{1});
  } else if (nested_absmax.present || nested_code.present || offset.present) {
    fail("absmax is float, so nested_absmax, nested_code and absmax_offset must be omitted");
  }

  const InputMeta bias = GetInputMeta(ctx, kInputBias);
  s.has_bias = bias.present;
  if (bias.present) {
    if (bias.type != a.type) {
      fail(std::string("input bias must have the type of A (") + TypeName(a.type) + "), got " + TypeName(bias.type));
    }
    if (bias.shape != std::vector<int64_t>{N}) {
      fail("input bias has shape " + ShapeString(bias.shape) + ", expected [N] = [" + std::to_string(N) + "]");
    }
  }
  return s;
}

}  // namespace onnx_nf4
