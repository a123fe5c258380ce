// matmul_nf4_op.h: the onnxruntime custom-op plumbing of MatMulNF4 shared by every execution provider: the op
// class (name, input and output types, kernel creation) and the boundary where exceptions become statuses (no
// C++ exception crosses the C API).
#ifndef ONNX_NF4_MATMUL_NF4_OP_H_
#define ONNX_NF4_MATMUL_NF4_OP_H_

#include <exception>
#include <new>
#include <string>

#include "matmul_nf4_args.h"
#include "ort_api.h"

namespace onnx_nf4 {

// Runs fn() and returns nullptr, or the status of what it threw: an Ort::Exception keeps its code and message,
// any other std::exception becomes ORT_FAIL ("out of memory" for std::bad_alloc). The message starts with
// "MatMulNF4 node '<*node_name>': ", or "MatMulNF4: " when node_name is nullptr (kernel creation).
template <typename Fn>
OrtStatusPtr StatusOf(const std::string* node_name, Fn&& fn) {
  const auto fail = [node_name](const char* what) {
    const std::string prefix = node_name != nullptr ? "MatMulNF4 node '" + *node_name + "': " : "MatMulNF4: ";
    return Ort::GetApi().CreateStatus(ORT_FAIL, (prefix + what).c_str());
  };
  try {
    fn();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::bad_alloc&) {
    return fail("out of memory");
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// The part of a MatMulNF4 kernel shared by the providers (CRTP): reads the attributes when the session creates
// it; per call validates the inputs, allocates Y and, unless A has no rows, runs
// Derived::Compute(ctx, shapes, y), turning whatever it throws into the returned status.
template <typename Derived>
class MatMulNF4Kernel {
 public:
  explicit MatMulNF4Kernel(const OrtKernelInfo* info) : attrs_(ReadMatMulNF4Attrs(Ort::ConstKernelInfo(info))) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    return StatusOf(&attrs_.node_name, [&] {
      const Ort::KernelContext ctx(context);
      const MatMulNF4Shapes s = ValidateMatMulNF4Inputs(attrs_, ctx);
      Ort::UnownedValue y = ctx.GetOutput(0, s.y_shape);
      if (s.M > 0) static_cast<const Derived&>(*this).Compute(ctx, s, y);
    });
  }

 protected:
  MatMulNF4Attrs attrs_;
};

// The MatMulNF4 op of one execution provider and activation type kType (of A, bias and Y). Kernel is built
// from the OrtKernelInfo (it validates the attributes), computes with ComputeV2, and names its provider in
// Kernel::kExecutionProvider.
template <typename Kernel, ONNXTensorElementDataType kType>
struct MatMulNF4Op : Ort::CustomOpBase<MatMulNF4Op<Kernel, kType>, Kernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    return StatusOf(nullptr, [&] { *kernel = new Kernel(info); });
  }
  const char* GetName() const { return "MatMulNF4"; }
  const char* GetExecutionProviderType() const { return Kernel::kExecutionProvider; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  // A and bias carry the op's type; the others are checked by ValidateMatMulNF4Inputs, whose messages are
  // clearer than a failed kernel lookup.
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == kInputA || index == kInputBias ? kType : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index <= kInputAbsmax ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t /*index*/) const { return kType; }
};

}  // namespace onnx_nf4

#endif  // ONNX_NF4_MATMUL_NF4_OP_H_
