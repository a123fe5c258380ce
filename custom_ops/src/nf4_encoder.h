// nf4_encoder.h: the instruction-set modules of the NF4 encoder (nf4_encoder_{portable,avx2,avx512}.cc) and what
// they share with the driver (nf4_encoder.cc, which validates, splits the work and runs the threads).
//
// The modules see float32 blocks only: the driver hands them either the caller's float32 data or a panel it has
// gathered (transposed, converted from float16 / bfloat16 / float64, zero-padded) with the module's gather.
// Helpers here are `static` (internal linkage): a copy compiled with AVX-512 flags must never be shared with the
// portable module, and the ISA modules instantiate no library templates for the same reason.
#ifndef ONNX_NF4_NF4_ENCODER_H_
#define ONNX_NF4_NF4_ENCODER_H_

#include <cstdint>
#include <cstring>

#include "onnx_nf4/nf4_codebook.h"

namespace onnx_nf4::encoder {

// ONNX TensorProto codes of the input element types.
enum DType : int32_t { kFloat32 = 1, kFloat16 = 10, kFloat64 = 11, kBFloat16 = 16 };

// Rounding rules (docs/codec.md): the bounds and the scale of an all-small block differ.
enum Rounding : int32_t { kOnnxruntime = 0, kBitsandbytes = 1 };

inline constexpr float kCodebook[ONNX_NF4_NUM_CODES] = {ONNX_NF4_CODEBOOK_VALUES};
inline constexpr float kOrtBounds[ONNX_NF4_NUM_THRESHOLDS] = {ONNX_NF4_THRESHOLD_VALUES};
inline constexpr float kBnbBounds[ONNX_NF4_NUM_THRESHOLDS] = {ONNX_NF4_BNB_MIDPOINT_VALUES};
inline constexpr float kBnbTinyScale = 1e-38f;  // bitsandbytes clamps absmax to at least this before 1 / absmax
inline constexpr int kErrorLanes = 16;

// The bounds of a branch-free binary search: with c = 0, then c = 2c + (s > table_r[c]) for r = 1..4, c ends as
// #{t in bounds : s > t}. table_1 = {b7}, table_2 = {b3, b11}, table_3 = {b1, b5, b9, b13}, table_4 = {b0, b2,
// ..., b14} (8 entries at most: one AVX2 permute per round). A NaN compares false everywhere: code 0.
struct SearchTables {
  float r1;
  float r2[8], r3[8], r4[8];
};

static inline SearchTables MakeSearchTables(int32_t rounding) {
  const float* b = rounding == kBitsandbytes ? kBnbBounds : kOrtBounds;
  SearchTables t{};
  t.r1 = b[7];
  for (int i = 0; i < 2; ++i) t.r2[i] = b[8 * i + 3];
  for (int i = 0; i < 4; ++i) t.r3[i] = b[4 * i + 1];
  for (int i = 0; i < 8; ++i) t.r4[i] = b[2 * i];
  return t;
}

// The factor a block's elements are multiplied by: onnxruntime 1 / absmax (0 for an all-zero block, inf below
// about 2.9e-39); bitsandbytes 1 / max(absmax, 1e-38). Both are float32 divisions, as numpy's.
static inline float ScaleInverse(float absmax, int32_t rounding) {
  if (rounding == kBitsandbytes) return 1.0f / (absmax > kBnbTinyScale ? absmax : kBnbTinyScale);
  return absmax != 0.0f ? 1.0f / absmax : 0.0f;
}

static inline float FloatFromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static inline uint32_t BitsOfFloat(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// |x| as bits: for non-negative floats the integer order is the float order, and NaN / Inf are the values
// >= kNotFiniteBits, so a block's absmax and its finiteness come from one integer maximum.
inline constexpr uint32_t kAbsMask = 0x7fffffffu;
inline constexpr uint32_t kNotFiniteBits = 0x7f800000u;

// Sums of squares in 16 float64 lanes: lane j adds the elements j, j + 16, j + 32, ... of each block, in block
// order; every ISA keeps this order, so the sums do not depend on the instruction set.
// Each square is a float64 multiply then a float64 add (no fused multiply-add), in every module.
struct ErrorLanes {
  double err[kErrorLanes];  // (x - fl32(NF4[code] * absmax))^2, the difference taken in float64
  double ref[kErrorLanes];  // x^2
};

// `count` blocks of `block_size` float32 values to encode. Block i starts at x + i * x_stride; its elements at
// positions >= valid are padding: they hold +0.0 and get code 7 whatever the scale.
struct BlockRun {
  const float* x = nullptr;
  int64_t x_stride = 0;
  int64_t count = 0;
  int64_t block_size = 0;  // a multiple of 16
  int64_t valid = 0;       // in (0, block_size]
  int32_t rounding = kOnnxruntime;
  uint8_t* packed = nullptr;  // block i's block_size / 2 bytes at packed + i * packed_stride
  int64_t packed_stride = 0;
  float* absmax = nullptr;  // block i's scale at absmax[i * absmax_stride]
  int64_t absmax_stride = 0;
  ErrorLanes* sums = nullptr;  // nullptr: no sums
};

// A rectangle of the input to copy as float32 into a panel: dst[t * ld + r] = float(src[r * stride_r +
// t * stride_t]) for r < rows, t < cols (strides in elements of dtype). A SIMD gather may prefetch the
// element `prefetch` elements after each one it reads (0: no prefetch; the address need not be valid).
struct GatherArgs {
  const void* src = nullptr;
  int32_t dtype = kFloat32;
  int64_t rows = 0, cols = 0;
  int64_t stride_r = 0, stride_t = 0;
  float* dst = nullptr;
  int64_t ld = 0;
  int64_t prefetch = 0;
};

// The encoder of one instruction set.
struct EncoderKernels {
  const char* name;
  // Encodes the run; false (outputs unspecified) when a block holds NaN or +-Inf.
  bool (*encode)(const BlockRun& run);
  void (*gather)(const GatherArgs& g);
};

const EncoderKernels& PortableEncoder();
#if defined(ONNX_NF4_HAVE_AVX2)
const EncoderKernels& Avx2Encoder();
#endif
#if defined(ONNX_NF4_HAVE_AVX512)
const EncoderKernels& Avx512Encoder();
#endif

// The scalar gather of rows [r0, r1) x columns [t0, t1) of g (portable module), for the SIMD gathers' edges.
void GatherRect(const GatherArgs& g, int64_t r0, int64_t r1, int64_t t0, int64_t t1);

}  // namespace onnx_nf4::encoder

#endif  // ONNX_NF4_NF4_ENCODER_H_
