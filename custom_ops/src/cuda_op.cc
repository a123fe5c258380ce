// cuda_op.cc: the MatMulNF4 kernel of the CUDA execution provider, and the library's CUDA test entry point.
//
// Validates the attributes at session creation and the inputs at each call (matmul_nf4_args.h, the same checks
// as the CPU op) before touching data, then queues the kernels of matmul_nf4.cu on the session's compute
// stream. All inputs stay on the device (the absmax offset too); nothing is copied and nothing waits.
#include "cuda_op.h"

#include <exception>
#include <string>

#include "matmul_nf4_args.h"
#include "matmul_nf4_cuda.h"
#include "matmul_nf4_op.h"

namespace onnx_nf4 {
namespace {

template <gpu::DType kDType>
class MatMulNF4CudaKernel final : public MatMulNF4Kernel<MatMulNF4CudaKernel<kDType>> {
 public:
  using MatMulNF4Kernel<MatMulNF4CudaKernel<kDType>>::MatMulNF4Kernel;

  static constexpr const char* kExecutionProvider = "CUDAExecutionProvider";

  // One validated call with at least one row of A (MatMulNF4Kernel::ComputeV2); y is the allocated Y.
  void Compute(const Ort::KernelContext& ctx, const MatMulNF4Shapes& s, Ort::UnownedValue& y) const {
    const MatMulNF4Attrs& attrs = this->attrs_;
    gpu::Problem p;
    p.dtype = kDType;
    p.A = ctx.GetInput(kInputA).GetTensorRawData();
    p.B = ctx.GetInput(kInputB).GetTensorData<uint8_t>();
    if (s.double_quant) {
      p.absmax_codes = ctx.GetInput(kInputAbsmax).GetTensorData<uint8_t>();
      p.nested_absmax = ctx.GetInput(kInputNestedAbsmax).GetTensorData<float>();
      p.nested_code = ctx.GetInput(kInputNestedCode).GetTensorData<float>();
      p.absmax_offset = ctx.GetInput(kInputAbsmaxOffset).GetTensorData<float>();
      p.nested_block_size = attrs.nested_block_size;
    } else {
      p.absmax = ctx.GetInput(kInputAbsmax).GetTensorData<float>();
    }
    p.bias = s.has_bias ? ctx.GetInput(kInputBias).GetTensorRawData() : nullptr;
    p.Y = y.GetTensorMutableRawData();
    p.M = s.M;
    p.K = attrs.K;
    p.N = attrs.N;
    p.block_size = attrs.block_size;

    const std::string error = gpu::LaunchMatMulNF4(p, gpu::Algo::kAuto, ctx.GetGPUComputeStream());
    if (!error.empty()) ThrowMatMulNF4Error(attrs.node_name, error, ORT_FAIL);
  }
};

}  // namespace

void RegisterCudaOps(Ort::CustomOpDomain& domain) {
  static MatMulNF4Op<MatMulNF4CudaKernel<gpu::DType::kFloat32>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_f32;
  static MatMulNF4Op<MatMulNF4CudaKernel<gpu::DType::kFloat16>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_f16;
  static MatMulNF4Op<MatMulNF4CudaKernel<gpu::DType::kBFloat16>, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16> op_bf16;
  domain.Add(&op_f32);
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
}

}  // namespace onnx_nf4

#if defined(_WIN32)
#define ONNX_NF4_CUDA_EXPORT __declspec(dllexport)
#else
#define ONNX_NF4_CUDA_EXPORT __attribute__((visibility("default")))
#endif

// Test and benchmark entry point: one MatMulNF4 call on raw device pointers, queued on `stream` (a
// cudaStream_t). dtype: 0 float32, 1 float16, 2 bfloat16; algo: 0 auto, 1 CUDA cores, 2 tensor cores.
// absmax_is_codes: absmax is uint8 codes (then nested_absmax, nested_code and absmax_offset are required).
// Checks scalars and alignment, not extents. Returns 0, or 1 with a message in err (NUL-terminated).
extern "C" ONNX_NF4_CUDA_EXPORT int onnx_nf4_cuda_matmul(
    int dtype, int algo, const void* A, const void* B, const void* absmax, int absmax_is_codes,
    const void* nested_absmax, const void* nested_code, const void* absmax_offset, const void* bias, void* Y, int64_t M,
    int64_t K, int64_t N, int64_t block_size, int64_t nested_block_size, void* stream, char* err, size_t err_len) {
  std::string error;
  if (dtype < 0 || dtype > 2) {
    error = "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)";
  } else if (algo < 0 || algo > 2) {
    error = "algo must be 0 (auto), 1 (CUDA cores) or 2 (tensor cores)";
  } else {
    onnx_nf4::gpu::Problem p;
    p.dtype = static_cast<onnx_nf4::gpu::DType>(dtype);
    p.A = A;
    p.B = static_cast<const uint8_t*>(B);
    if (absmax_is_codes) {
      p.absmax_codes = static_cast<const uint8_t*>(absmax);
      p.nested_absmax = static_cast<const float*>(nested_absmax);
      p.nested_code = static_cast<const float*>(nested_code);
      p.absmax_offset = static_cast<const float*>(absmax_offset);
    } else {
      p.absmax = static_cast<const float*>(absmax);
    }
    p.bias = bias;
    p.Y = Y;
    p.M = M;
    p.K = K;
    p.N = N;
    p.block_size = block_size;
    p.nested_block_size = nested_block_size;
    try {
      error = onnx_nf4::gpu::LaunchMatMulNF4(p, static_cast<onnx_nf4::gpu::Algo>(algo), stream);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (error.empty()) return 0;
  if (err != nullptr && err_len > 0) {
    const size_t n = error.size() < err_len - 1 ? error.size() : err_len - 1;
    error.copy(err, n);
    err[n] = '\0';
  }
  return 1;
}
