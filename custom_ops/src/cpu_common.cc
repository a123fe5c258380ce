// cpu_common.cc: activation quantization and ISA dispatch shared by the CPU kernels.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu_isa.h"
#include "cpu_kernels.h"

#if defined(ONNX_NF4_HAVE_AVX2)
#include <cpuid.h>
#endif

namespace onnx_nf4::cpu {

void QuantizeRowInt8(const float* a, int64_t K, int64_t block_size, int64_t k_blocks, int64_t group, int8_t* q,
                     float* scale, int32_t* qsum) {
  for (int64_t b = 0; b < k_blocks; ++b) {
    const int64_t k0 = b * block_size;
    const int64_t k1 = k0 + block_size < K ? k0 + block_size : K;
    float amax = 0.0f;
    for (int64_t k = k0; k < k1; ++k) amax = std::fmax(amax, std::fabs(a[k]));
    const float s = amax / kInt8Levels;
    const float inv = QuantizeFactor(amax);
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

// The kernel sets from the most capable down, each with its level and whether this CPU runs it.
struct Candidate {
  IsaLevel level;
  bool runs;
  const KernelSet& (*set)();
};

#if defined(ONNX_NF4_HAVE_AVX2)
bool RunsAvx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// AVX-VNNI: CPUID leaf 7, sub-leaf 1, EAX bit 4 (read directly: not every compiler's __builtin_cpu_supports
// knows it). The OS saves the ymm state when AVX2 runs at all.
bool RunsAvxVnni() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 4)) != 0;
}
#endif

const KernelSet& Select() {
  const Candidate candidates[] = {
#if defined(ONNX_NF4_HAVE_AVX512)
      {IsaLevel::kAvx512,
       RunsAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni"),
       Avx512Kernels},
#endif
#if defined(ONNX_NF4_HAVE_AVX2)
      {IsaLevel::kAvx2Vnni, RunsAvx2() && RunsAvxVnni(), Avx2VnniKernels},
      {IsaLevel::kAvx2, RunsAvx2(), Avx2Kernels},
#endif
      {IsaLevel::kPortable, true, PortableKernels},
  };
  const IsaLevel cap = IsaCap();
  for (const Candidate& c : candidates) {
    if (c.level <= cap && c.runs) return c.set();
  }
  return PortableKernels();
}

}  // namespace

int64_t L1DataCacheBytes() {
  static const int64_t bytes = [] {
    constexpr int64_t kDefault = 32 << 10, kMin = 16 << 10, kMax = 1 << 20;
#if defined(_SC_LEVEL1_DCACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL1_DCACHE_SIZE);  // NOLINT(runtime/int): the POSIX type
    if (reported > 0) return std::min(kMax, std::max(kMin, static_cast<int64_t>(reported)));
#endif
    return kDefault;
  }();
  return bytes;
}

IsaLevel IsaCap() {
  const char* cap = std::getenv("ONNX_NF4_CPU_ISA");
  if (cap == nullptr) return IsaLevel::kAvx512;
  const struct {
    const char* name;
    IsaLevel level;
  } levels[] = {{"portable", IsaLevel::kPortable},
                {"avx2", IsaLevel::kAvx2},
                {"avx2vnni", IsaLevel::kAvx2Vnni},
                {"avx512", IsaLevel::kAvx512}};
  for (const auto& l : levels) {
    if (std::strcmp(cap, l.name) == 0) return l.level;
  }
  return IsaLevel::kAvx512;
}

const KernelSet& Dispatch() {
  static const KernelSet& selected = Select();
  return selected;
}

}  // namespace onnx_nf4::cpu
