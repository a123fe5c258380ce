// cpu_common.cc: activation quantization and ISA dispatch shared by the CPU kernels.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace onnx_nf4::cpu {

const int8_t kNF4I8[ONNX_NF4_NUM_CODES] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

void QuantizeRowInt8(const float* a, int64_t K, int64_t block_size, int64_t k_blocks, int64_t group, int8_t* q,
                     float* scale, int32_t* qsum) {
  for (int64_t b = 0; b < k_blocks; ++b) {
    const int64_t k0 = b * block_size;
    const int64_t k1 = k0 + block_size < K ? k0 + block_size : K;
    float amax = 0.0f;
    for (int64_t k = k0; k < k1; ++k) amax = std::fmax(amax, std::fabs(a[k]));
    const float s = amax / kInt8Levels;
    const float inv = s > 0.0f ? kInt8Levels / amax : 0.0f;
    int32_t sum = 0;
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(a[k] * inv));
      const int32_t c = v > 127 ? 127 : (v < -127 ? -127 : v);
      q[CodeOrderPos(k, group)] = static_cast<int8_t>(c);
      sum += c;
    }
    scale[b] = s;
    if (qsum != nullptr) qsum[b] = sum;
  }
}

Int8Activations QuantizeActivationsInt8(const Problem& p, int64_t group, bool sums, Scratch& scratch) {
  const Nf4Weight& w = p.w;
  const int64_t kb = w.k_blocks, kpad = kb * w.block_size;
  auto* qa = static_cast<int8_t*>(scratch.Zeroed(static_cast<size_t>(p.M * kpad)));
  auto* ascale = static_cast<float*>(scratch.Zeroed(sizeof(float) * static_cast<size_t>(p.M * kb)));
  int32_t* qsum = nullptr;
  if (sums) qsum = static_cast<int32_t*>(scratch.Zeroed(sizeof(int32_t) * static_cast<size_t>(p.M * kb)));
  for (int64_t m = 0; m < p.M; ++m) {
    QuantizeRowInt8(p.A + m * w.K, w.K, w.block_size, kb, group, qa + m * kpad, ascale + m * kb,
                    qsum != nullptr ? qsum + m * kb : nullptr);
  }
  return {&p, qa, ascale, qsum, kpad};
}

namespace {

const KernelSet& Best() {
#if defined(ONNX_NF4_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni")) {
    return Avx512Kernels();
  }
#endif
#if defined(ONNX_NF4_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Avx2Kernels();
#endif
  return PortableKernels();
}

const KernelSet& Select() {
  const KernelSet& best = Best();
  const char* cap = std::getenv("ONNX_NF4_CPU_ISA");
  if (cap == nullptr) return best;
  if (std::strcmp(cap, "portable") == 0) return PortableKernels();
#if defined(ONNX_NF4_HAVE_AVX2)
  if (std::strcmp(cap, "avx2") == 0 && std::strcmp(best.name, "portable") != 0) return Avx2Kernels();
#endif
  return best;
}

}  // namespace

const KernelSet& Dispatch() {
  static const KernelSet& selected = Select();
  return selected;
}

}  // namespace onnx_nf4::cpu
