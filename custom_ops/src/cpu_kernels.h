// cpu_kernels.h: the CPU compute of MatMulNF4, independent of onnxruntime.
//
// Y[M, N] = A[M, K] @ W[K, N] (+ bias), W given in the MatMulNF4 layout (docs/MatMulNF4.md). All tensors are
// float32 and C-contiguous here; the op converts float16 / bfloat16 at its boundary. Sizes were validated
// before (matmul_nf4_args.h), so the kernels trust them.
//
// Every kernel set (portable C++, AVX2+FMA, AVX2+FMA+AVX-VNNI, AVX-512) implements the same KernelSet;
// Dispatch() picks one at run time from the CPU's features. docs/cpu_kernel.md describes the algorithms.
#ifndef ONNX_NF4_CPU_KERNELS_H_
#define ONNX_NF4_CPU_KERNELS_H_

#include <cstddef>
#include <cstdint>

#include "onnx_nf4/nf4_codebook.h"

namespace onnx_nf4::cpu {

inline constexpr float kNF4[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_VALUES};

// An NF4 weight in the MatMulNF4 layout.
struct Nf4Weight {
  int64_t K = 0, N = 0, block_size = 0, k_blocks = 0;
  const uint8_t* packed = nullptr;  // [N, k_blocks, block_size / 2]; high nibble = even k
  const float* absmax = nullptr;    // [N, k_blocks] float32 scales, or nullptr when double-quantized
  // Double quantization (absmax == nullptr): scale = fl32(fl32(nested_code[c] * nested_absmax[f / nbs]) + offset).
  const uint8_t* absmax_codes = nullptr;  // [N, k_blocks]
  const float* nested_absmax = nullptr;   // [ceil(N * k_blocks / nested_block_size)]
  const float* nested_code = nullptr;     // [256]
  float absmax_offset = 0.0f;
  int64_t nested_block_size = 256;
};

namespace {  // NOLINT(build/namespaces): internal linkage, so no copy built with one module's ISA flags is shared

// The scale of block b of column n (rule 1 of the spec, bit-exact: the library is built with -ffp-contract=off,
// so the double-quantization product and sum round separately).
inline float BlockScale(const Nf4Weight& w, int64_t n, int64_t b) {
  const int64_t f = n * w.k_blocks + b;
  if (w.absmax != nullptr) return w.absmax[f];
  const int nested_shift = __builtin_ctzll(static_cast<unsigned long long>(w.nested_block_size));
  const float product = w.nested_code[w.absmax_codes[f]] * w.nested_absmax[f >> nested_shift];
  return product + w.absmax_offset;
}

}  // namespace

// The work (multiply-adds, or elements for a packing loop) below which a parallel loop runs on the calling thread:
// handing tasks to the intra-op threads costs microseconds (a futex wake when they sleep), about the time one core
// takes for this much work. A decode step of a small LLM (hidden 576) runs 151 MatMuls of 0.3 to 28 M multiply-adds,
// a tiny layer (64 x 64) 4 K: fanning that out would cost more than it computes.
inline constexpr int64_t kMinParallelWork = int64_t{1} << 17;

// Runs fn(data, i) for i in [0, total), possibly concurrently; fn must not throw. `work` is the whole loop's work
// in the units of kMinParallelWork: below it (or with one task) the tasks run in order on the calling thread.
class ParallelRunner {
 public:
  virtual ~ParallelRunner() = default;
  virtual void For(size_t total, int64_t work, void (*fn)(void* data, size_t i), void* data) const = 0;
};

// Per-call scratch memory, owned by the caller (so that the ISA modules instantiate no library templates:
// an out-of-line copy built with AVX-512 flags could otherwise be picked by the linker for portable code). The op
// serves it from memory kept by the calling thread from call to call, so that a steady stream of calls allocates
// nothing.
class Scratch {
 public:
  virtual ~Scratch() = default;
  // Zero-filled memory of `bytes` bytes, 64-byte aligned, valid until the op returns. Throws std::bad_alloc.
  virtual void* Zeroed(size_t bytes) = 0;
  // The same without the zero fill, for buffers the kernel writes before reading.
  virtual void* Uninitialized(size_t bytes) = 0;
};

// One call of the op in float32.
struct Problem {
  int64_t M = 0;
  const float* A = nullptr;  // [M, K]
  Nf4Weight w;
  const float* bias = nullptr;    // [N] or nullptr
  float* Y = nullptr;             // [M, N]
  bool int8_activations = false;  // accuracy_level 4
};

// The kernels of one instruction set.
struct KernelSet {
  const char* name;
  // float32 compute; rows M are split into the decode-bound path (small M) and tiles (large M) inside.
  void (*matmul_f32)(const Problem& p, const ParallelRunner& par, Scratch& scratch);
  // accuracy_level 4: A quantized to int8 per (row, weight block), integer dot products.
  void (*matmul_int8)(const Problem& p, const ParallelRunner& par, Scratch& scratch);
};

const KernelSet& PortableKernels();
#if defined(ONNX_NF4_HAVE_AVX2)
const KernelSet& Avx2Kernels();      // "avx2": AVX2 + FMA (+ F16C)
const KernelSet& Avx2VnniKernels();  // "avx2vnni": the AVX2 set with AVX-VNNI (vpdpbusd on ymm) for int8
// accuracy_level 4 of the AVX2 and AVX-512 sets (kernels_i8_*.cc).
void Avx2MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch);
#endif
#if defined(ONNX_NF4_HAVE_AVX512)
const KernelSet& Avx512Kernels();  // "avx512": AVX-512 F, BW, VL, DQ, VNNI
void Avx512MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch);
#endif

// The best kernel set this CPU runs, chosen once. ONNX_NF4_CPU_ISA=portable|avx2|avx2vnni|avx512 in the
// environment caps it (for tests and benchmarks): the chosen set is the best one that the CPU runs among
// the named one and those below it in that order (so avx2vnni on a CPU without AVX-VNNI gives avx2). An
// unknown value is ignored.
const KernelSet& Dispatch();

// The L1 data cache of one core in bytes, as the CPU reports it (sysconf, which glibc answers from CPUID), read
// once; 32 KiB where it reports nothing, and clamped to [16 KiB, 1 MiB]. Weight streaming sizes the pieces of K
// whose activation rows stay in L1 with it.
int64_t L1DataCacheBytes();

// --- helpers shared by the ISA modules ---

// Position of k in "code order" of group size G (even, dividing K_pad): within each run of G consecutive k,
// the G/2 even k first, then the G/2 odd k (the order in which the SIMD kernels decode a run of codes).
// G = 2 is the natural order.
inline constexpr int64_t CodeOrderPos(int64_t k, int64_t group) {
  return (k / group) * group + (k % group) / 2 + (k & 1) * (group / 2);
}

// The int8 image of the NF4 table used by accuracy_level 4 (generated from onnx_nf4/codec/codebook.py):
// kNF4I8[c] = round(NF4[c] * 127), so that W ~= kNF4I8[c] * scale / 127.
inline constexpr float kInt8Levels = ONNX_NF4_I8_LEVELS;
inline constexpr int8_t kNF4I8[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_I8_VALUES};

// The factor 127 / amax that maps a block of activations to int8; 0 for an all-zero block and for one whose
// maximum is so small (below about 3.7e-37) that the factor would overflow: such a block quantizes to zeros.
inline float QuantizeFactor(float amax) {
  const float inv = amax > 0.0f ? kInt8Levels / amax : 0.0f;
  return inv <= 3.4028234663852886e38f ? inv : 0.0f;
}

// Int8 quantization of one activation row, per block of `block_size` along K (K_pad = k_blocks * block_size):
// scale[b] = max|a| / 127 over the block, q = round_half_even(a * QuantizeFactor(max|a|)),
// written at CodeOrderPos(k, group) of q[K_pad] (the padding k in [K, K_pad) stays as given: zero it), and
// qsum[b] = sum of q over the block (unless qsum is nullptr).
void QuantizeRowInt8(const float* a, int64_t K, int64_t block_size, int64_t k_blocks, int64_t group, int8_t* q,
                     float* scale, int32_t* qsum);

// The activations of one call quantized for accuracy_level 4 (QuantizeActivationsInt8), in scratch memory.
struct Int8Activations {
  const Problem* p = nullptr;
  const int8_t* qa = nullptr;     // [M][K_pad] in code order of the kernel's group
  const float* ascale = nullptr;  // [M][k_blocks]
  const int32_t* qsum = nullptr;  // [M][k_blocks], or nullptr when not asked for
  int64_t kpad = 0;               // K_pad = k_blocks * block_size
};

// Quantizes every row of p.A by QuantizeRowInt8 in code order of `group` into zeroed scratch buffers, with the
// per-block sums when `sums`. Throws std::bad_alloc.
Int8Activations QuantizeActivationsInt8(const Problem& p, int64_t group, bool sums, Scratch& scratch);

// Ceil-divides a by b (a >= 0, b > 0).
inline constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace onnx_nf4::cpu

#endif  // ONNX_NF4_CPU_KERNELS_H_
