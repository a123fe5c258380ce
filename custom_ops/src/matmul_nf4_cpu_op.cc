// matmul_nf4_cpu_op.cc: the MatMulNF4 kernel of the CPU execution provider.
//
// Validates every attribute at session creation and every input at each call (matmul_nf4_args.h) before
// reading data, converts float16 / bfloat16 A and bias to float32, runs the dispatched kernel set
// (cpu_kernels.h) on the session's intra-op thread pool and converts Y back. Errors become onnxruntime
// statuses; no exception leaves the library.
#include "matmul_nf4_cpu_op.h"

#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "matmul_nf4_args.h"

namespace onnx_nf4 {
namespace {

// Runs the kernel's parallel loops on the session's intra-op thread pool.
class OrtParallelRunner final : public cpu::ParallelRunner {
 public:
  explicit OrtParallelRunner(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void For(size_t total, void (*fn)(void*, size_t), void* data) const override {
    if (total == 0) return;
    if (total == 1) {
      fn(data, 0);
      return;
    }
    ctx_.ParallelFor(fn, total, 0, data);
  }

 private:
  const Ort::KernelContext& ctx_;
};

// Scratch buffers of one call, freed when it returns.
class CallScratch final : public cpu::Scratch {
 public:
  void* Zeroed(size_t bytes) override { return Allocate(bytes, true); }
  void* Uninitialized(size_t bytes) override { return Allocate(bytes, false); }

 private:
  void* Allocate(size_t bytes, bool zero) {
    constexpr size_t kAlign = 64;
    std::unique_ptr<char[]> buf(zero ? new char[bytes + kAlign]() : new char[bytes + kAlign]);
    char* data = buf.get();
    buffers_.push_back(std::move(buf));
    const auto addr = reinterpret_cast<uintptr_t>(data);
    return data + ((kAlign - addr % kAlign) % kAlign);
  }

  std::vector<std::unique_ptr<char[]>> buffers_;
};

// float16 / bfloat16 -> float32 by the onnxruntime header types (the way back, T(float), rounds to nearest
// even).
template <typename T>
std::vector<float> ToFloatVector(const T* src, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = src[i].ToFloat();
  return out;
}

template <typename T>
class MatMulNF4CpuKernel {
 public:
  explicit MatMulNF4CpuKernel(const OrtKernelInfo* info) : attrs_(ReadMatMulNF4Attrs(Ort::ConstKernelInfo(info))) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) const {
    try {
      Run(Ort::KernelContext(context));
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::bad_alloc&) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, ("MatMulNF4 node '" + attrs_.node_name + "': out of memory").c_str());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, ("MatMulNF4 node '" + attrs_.node_name + "': " + e.what()).c_str());
    }
  }

 private:
  void Run(const Ort::KernelContext& ctx) const {
    const MatMulNF4Shapes s = ValidateMatMulNF4Inputs(attrs_, ctx);
    Ort::UnownedValue y_value = ctx.GetOutput(0, s.y_shape);
    if (s.M == 0) return;
    const int64_t K = attrs_.K, N = attrs_.N;

    cpu::Problem p;
    p.M = s.M;
    p.int8_activations = attrs_.accuracy_level == 4;
    cpu::Nf4Weight& w = p.w;
    w.K = K;
    w.N = N;
    w.block_size = attrs_.block_size;
    w.k_blocks = attrs_.k_blocks;
    w.packed = ctx.GetInput(kInputB).GetTensorData<uint8_t>();
    if (s.double_quant) {
      w.absmax_codes = ctx.GetInput(kInputAbsmax).GetTensorData<uint8_t>();
      w.nested_absmax = ctx.GetInput(kInputNestedAbsmax).GetTensorData<float>();
      w.nested_code = ctx.GetInput(kInputNestedCode).GetTensorData<float>();
      w.absmax_offset = ctx.GetInput(kInputAbsmaxOffset).GetTensorData<float>()[0];
      w.nested_block_size = attrs_.nested_block_size;
    } else {
      w.absmax = ctx.GetInput(kInputAbsmax).GetTensorData<float>();
    }

    const T* a = ctx.GetInput(kInputA).GetTensorData<T>();
    const T* bias = s.has_bias ? ctx.GetInput(kInputBias).GetTensorData<T>() : nullptr;
    T* y = y_value.GetTensorMutableData<T>();
    const size_t a_count = static_cast<size_t>(s.M * K), y_count = static_cast<size_t>(s.M * N);

    std::vector<float> a_f32, bias_f32, y_f32;
    if constexpr (std::is_same_v<T, float>) {
      p.A = a;
      p.bias = bias;
      p.Y = y;
    } else {
      a_f32 = ToFloatVector(a, a_count);
      p.A = a_f32.data();
      if (bias != nullptr) {
        bias_f32 = ToFloatVector(bias, static_cast<size_t>(N));
        p.bias = bias_f32.data();
      }
      y_f32.resize(y_count);
      p.Y = y_f32.data();
    }

    const cpu::KernelSet& kernels = cpu::Dispatch();
    OrtParallelRunner runner(ctx);
    CallScratch scratch;
    (p.int8_activations ? kernels.matmul_int8 : kernels.matmul_f32)(p, runner, scratch);

    if constexpr (!std::is_same_v<T, float>) {
      for (size_t i = 0; i < y_count; ++i) y[i] = T(y_f32[i]);
    }
  }

  MatMulNF4Attrs attrs_;
};

template <typename T, ONNXTensorElementDataType kType>
struct MatMulNF4CpuOp : Ort::CustomOpBase<MatMulNF4CpuOp<T, kType>, MatMulNF4CpuKernel<T>, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& /*api*/, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new MatMulNF4CpuKernel<T>(info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, (std::string("MatMulNF4: ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return "MatMulNF4"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
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

}  // namespace

void RegisterCpuOps(Ort::CustomOpDomain& domain) {
  static MatMulNF4CpuOp<float, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_f32;
  static MatMulNF4CpuOp<Ort::Float16_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_f16;
  static MatMulNF4CpuOp<Ort::BFloat16_t, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16> op_bf16;
  domain.Add(&op_f32);
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
}

}  // namespace onnx_nf4
