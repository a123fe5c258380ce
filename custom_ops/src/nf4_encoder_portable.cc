// nf4_encoder_portable.cc: the NF4 encoder in plain C++ (any CPU), and the scalar gather the SIMD modules use at
// the edges of a panel. The rules are those of docs/codec.md; nf4_encoder.h describes the interface.
#include <cstring>

#include "nf4_encoder.h"

namespace onnx_nf4::encoder {

namespace {

// float16 bits to float32, exact (subnormals, infinities and NaN included).
float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return FloatFromBits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return FloatFromBits(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return FloatFromBits(sign);
  // Subnormal: value = mantissa * 2^-24, normalized into float32.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  return FloatFromBits(sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3ffu) << 13));
}

float LoadAsFloat(const void* src, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kFloat16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const uint16_t*>(src) + index, sizeof h);
      return HalfToFloat(h);
    }
    case kBFloat16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const uint16_t*>(src) + index, sizeof h);
      return FloatFromBits(static_cast<uint32_t>(h) << 16);
    }
    case kFloat64: return static_cast<float>(static_cast<const double*>(src)[index]);
    default: return static_cast<const float*>(src)[index];
  }
}

int Code(float s, const float* bounds) {
  int code = 0;
  for (int i = 0; i < ONNX_NF4_NUM_THRESHOLDS; ++i) code += s > bounds[i];
  return code;
}

bool Encode(const BlockRun& run) {
  const float* bounds = run.rounding == kBitsandbytes ? kBnbBounds : kOrtBounds;
  const int64_t bs = run.block_size;
  for (int64_t i = 0; i < run.count; ++i) {
    const float* x = run.x + i * run.x_stride;
    uint32_t max_bits = 0;
    for (int64_t j = 0; j < bs; ++j) {
      const uint32_t bits = BitsOfFloat(x[j]) & kAbsMask;
      max_bits = bits > max_bits ? bits : max_bits;
    }
    if (max_bits >= kNotFiniteBits) return false;
    const float absmax = FloatFromBits(max_bits);
    const float inv = ScaleInverse(absmax, run.rounding);
    uint8_t* out = run.packed + i * run.packed_stride;
    for (int64_t j = 0; j < bs; j += 2) {
      const int hi = j < run.valid ? Code(x[j] * inv, bounds) : ONNX_NF4_ZERO_CODE;
      const int lo = j + 1 < run.valid ? Code(x[j + 1] * inv, bounds) : ONNX_NF4_ZERO_CODE;
      out[j / 2] = static_cast<uint8_t>(hi << 4 | lo);
      if (run.sums != nullptr) {
        const int codes[2] = {hi, lo};
        for (int e = 0; e < 2; ++e) {
          const float value = x[j + e];
          const float decoded = kCodebook[codes[e]] * absmax;  // float32 product
          const double diff = static_cast<double>(value) - static_cast<double>(decoded);
          const int lane = static_cast<int>((j + e) % kErrorLanes);
          run.sums->err[lane] += diff * diff;
          run.sums->ref[lane] += static_cast<double>(value) * value;
        }
      }
    }
    run.absmax[i * run.absmax_stride] = absmax;
  }
  return true;
}

void Gather(const GatherArgs& g) { GatherRect(g, 0, g.rows, 0, g.cols); }

}  // namespace

void GatherRect(const GatherArgs& g, int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = g.dst + t * g.ld;
    for (int64_t r = r0; r < r1; ++r) dst[r] = LoadAsFloat(g.src, g.dtype, r * g.stride_r + t * g.stride_t);
  }
}

const EncoderKernels& PortableEncoder() {
  static const EncoderKernels kernels{"portable", Encode, Gather};
  return kernels;
}

}  // namespace onnx_nf4::encoder
