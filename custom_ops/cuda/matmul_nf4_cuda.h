// matmul_nf4_cuda.h: host interface of the CUDA kernels of onnx_nf4::MatMulNF4 (matmul_nf4.cu).
//
// Plain C++ (no CUDA headers), so that the onnxruntime op (cuda_op.cc) and the test entry point can be
// compiled by the host compiler. Every pointer is a device pointer; nothing is copied and nothing waits for
// the device: the kernels are queued on `stream` (a cudaStream_t, nullptr for the legacy default stream).
#ifndef ONNX_NF4_MATMUL_NF4_CUDA_H_
#define ONNX_NF4_MATMUL_NF4_CUDA_H_

#include <cstdint>
#include <string>

namespace onnx_nf4 {
namespace gpu {

// Element type of A, bias and Y.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Kernel family. kAuto: tensor cores (kMma) for float16 / bfloat16, CUDA cores (kSimt) for float32.
enum class Algo : int { kAuto = 0, kSimt = 1, kMma = 2 };

// One call Y[M, N] = A[M, K] @ W (+ bias), W in the MatMulNF4 layout (docs/MatMulNF4.md). Row-major,
// contiguous tensors. absmax is float32 [N, k_blocks], or (double quantization) absmax_codes is uint8
// [N, k_blocks] with nested_absmax, nested_code[256] and absmax_offset (one float, on the device).
struct Problem {
  DType dtype = DType::kFloat32;
  const void* A = nullptr;
  const uint8_t* B = nullptr;     // [N, k_blocks, block_size / 2], 8-byte aligned
  const float* absmax = nullptr;  // set exactly when absmax_codes is null
  const uint8_t* absmax_codes = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* absmax_offset = nullptr;
  const void* bias = nullptr;  // [N] or null
  void* Y = nullptr;
  int64_t M = 0;
  int64_t K = 0;
  int64_t N = 0;
  int64_t block_size = 0;           // power of two in [16, 4096]
  int64_t nested_block_size = 256;  // power of two >= 16 (double quantization only)
};

// Queues the kernels of one call on `stream`. Checks the scalars, the pointers' presence and alignment (not
// the tensors' extents, which the caller owns). Returns "" on success, else an error message.
std::string LaunchMatMulNF4(const Problem& p, Algo algo, void* stream);

}  // namespace gpu
}  // namespace onnx_nf4

#endif  // ONNX_NF4_MATMUL_NF4_CUDA_H_
