// register.cc: the library's C entry points (cmake/exports.map lists every exported symbol): RegisterCustomOps
// (onnxruntime's custom-op entry point) and OnnxNF4CpuKernelSet (the name of the CPU kernel set in use).
//
// RegisterCustomOps registers domain "onnx_nf4" (opset 1) with MatMulNF4 on the CPU execution provider and,
// when the library was built with CUDA, on the CUDA execution provider.
#include <exception>
#include <mutex>

#include "cpu_kernels.h"
#include "matmul_nf4_cpu_op.h"
#include "ort_api.h"
#ifdef ONNX_NF4_WITH_CUDA
#include "cuda_op.h"
#endif

#if defined(_WIN32)
#define ONNX_NF4_EXPORT __declspec(dllexport)
#else
#define ONNX_NF4_EXPORT __attribute__((visibility("default")))
#endif

namespace {

constexpr const char* kDomain = "onnx_nf4";

// The domain outlives every session that uses it, so it is created once and never released.
Ort::CustomOpDomain& Domain() {
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain(kDomain);
    onnx_nf4::RegisterCpuOps(*d);
#ifdef ONNX_NF4_WITH_CUDA
    onnx_nf4::RegisterCudaOps(*d);
#endif
    return d;
  }();
  return *domain;
}

}  // namespace

extern "C" ONNX_NF4_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                     const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    return api_base->GetApi(1)->CreateStatus(
        ORT_FAIL, "onnx_nf4: this onnxruntime is older than the headers the library was built with");
  }
  static std::once_flag init;
  std::call_once(init, [api] { Ort::InitApi(api); });
  try {
    Ort::UnownedSessionOptions(options).Add(Domain());
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// The name of the CPU kernel set that MatMulNF4 runs in this process ("avx512", "avx2vnni", "avx2" or
// "portable"; docs/cpu_kernel.md): the best one the CPU runs, capped by ONNX_NF4_CPU_ISA. Chosen at the first
// call of this function or of the op, then fixed. A static string: the caller must not free it.
extern "C" ONNX_NF4_EXPORT const char* OnnxNF4CpuKernelSet(void) { return onnx_nf4::cpu::Dispatch().name; }
