// kernels_i8_avx512.cc: accuracy_level 4 on AVX-512 (F, BW, VL, DQ, VNNI): vpdpbusd on 512-bit vectors. Built
// with those -m flags; only called when the CPU has them (cpu_common.cc). docs/cpu_kernel.md explains the
// algorithms.
//
// A step decodes 32 bytes of B (64 codes): both halves of a zmm get the bytes, the lower half shifted right by
// 4 (high nibbles: even k), the upper half not (low nibbles: odd k), then vpshufb maps them to unsigned bytes
// round(NF4 * 127) + 128 for vpdpbusd against the signed activations.
#include <immintrin.h>

#include <cstring>

#include "cpu_kernels.h"
#include "simd_i8_kernels.h"

namespace onnx_nf4::cpu {
namespace {

struct I8Avx512 {
  using VecI = __m512i;
  using VecF = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kGroup = 64;
  static constexpr bool kBiased = true;
  static constexpr int kGemvRows = 4;
  static constexpr int kGemvColumns = 4;
  static constexpr int kGemmV = 1;
  static constexpr int kGemmTN = 12;  // 12 accumulators + 12 totals + operands: 32 registers
  static constexpr int64_t kMinGemmRows = 8;

  static VecI ZeroI() { return _mm512_setzero_si512(); }
  static VecI LoadI(const void* p) { return _mm512_loadu_si512(p); }
  static void StoreI(void* p, VecI v) { _mm512_storeu_si512(p, v); }
  static VecI AddI(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
  static VecI FirstLaneI(int32_t x) { return _mm512_maskz_set1_epi32(1, x); }  // x, then zeros
  static VecI Broadcast32(const void* p) {
    int32_t x;
    std::memcpy(&x, p, 4);
    return _mm512_set1_epi32(x);
  }

  static VecF ZeroF() { return _mm512_setzero_ps(); }
  static VecF LoadF(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreF(float* p, VecF v) { _mm512_storeu_ps(p, v); }
  static VecF Set1F(float x) { return _mm512_set1_ps(x); }
  static VecF AddF(VecF a, VecF b) { return _mm512_add_ps(a, b); }
  static VecF MulF(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
  static VecF MaxF(VecF a, VecF b) { return _mm512_max_ps(a, b); }
  static VecF AndNotF(VecF a, VecF b) { return _mm512_andnot_ps(a, b); }
  static VecF FmaddF(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
  static VecF CvtF(VecI v) { return _mm512_cvtepi32_ps(v); }
  static float SumF(VecF v) { return _mm512_reduce_add_ps(v); }

  struct Table {
    __m512i bytes, shifts, mask;
  };
  static Table DecodeTable() {
    return {_mm512_broadcast_i32x4(I8Table128(true)),
            _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_setzero_si256(), 1), _mm512_set1_epi8(0x0F)};
  }
  static constexpr int kDecodeVecs = 1;
  static void Decode(const uint8_t* bytes, const Table& t, VecI* out) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    out[0] = _mm512_shuffle_epi8(t.bytes, _mm512_and_si512(_mm512_srlv_epi16(v, t.shifts), t.mask));
  }

  using Shared = VecI;
  static Shared Share(VecI v) { return v; }
  // vpdpbusd in inline assembly: GCC 12 wraps the intrinsic's accumulator in two register copies per
  // instruction inside loops (measured: 24 vmovdqa per 12 vpdpbusd in the GEMM tile).
  static VecI Dot(VecI acc, VecI w, VecI a) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "vm"(a));
    return acc;
  }
  static VecI DotSharedW(VecI acc, VecI w, VecI a) { return Dot(acc, w, a); }
  static VecI DotSharedA(VecI acc, VecI w, VecI a) { return Dot(acc, w, a); }
};

}  // namespace

void Avx512MatMulInt8(const Problem& p, const ParallelRunner& par, Scratch& scratch) {
  if (p.M < I8Avx512::kMinGemmRows && p.w.block_size % I8Avx512::kGroup != 0) {
    Avx2MatMulInt8(p, par, scratch);  // weight streaming with 32-code steps (block 32), or 16
  } else {
    I8MatMul<I8Avx512>(p, par, scratch);
  }
}

}  // namespace onnx_nf4::cpu
