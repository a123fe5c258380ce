/* nf4_encoder_api.h: the C entry points of the NF4 encoder exported by libonnx_nf4_ops.
 *
 * The encoder turns float weights into NF4 codes and float32 block scales, bit for bit as onnx_nf4.codec
 * (docs/codec.md): absmax per block, code = #{bounds t : x * (1 / absmax) > t}, two codes per byte (high nibble
 * first). It runs on several threads and picks AVX-512, AVX2 or portable code at run time (ONNX_NF4_CPU_ISA caps
 * it as for the MatMulNF4 kernels).
 *
 * Every function validates its arguments and returns a status (ONNX_NF4_ENCODER_*); it never throws, aborts or
 * reads outside the sizes it is given. On an error the outputs are unspecified.
 *
 * dtype: the ONNX TensorProto code of the input: 1 float32, 10 float16, 11 float64 (rounded to float32 first,
 * as numpy's astype does), 16 bfloat16. rounding: 0 onnxruntime (default of onnx_nf4), 1 bitsandbytes.
 * threads: worker threads, 0 for the hardware's thread count. sums: NULL, or double[2] that receives the sum
 * over all encoded elements of (x - decoded)^2 and of x^2 (x the float32 input value, decoded =
 * fl32(NF4[code] * absmax), difference, square and sum in float64, in an order that depends neither on the
 * thread count nor on the instruction set).
 */
#ifndef ONNX_NF4_NF4_ENCODER_API_H_
#define ONNX_NF4_NF4_ENCODER_API_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ONNX_NF4_ENCODER_OK 0
#define ONNX_NF4_ENCODER_INVALID_ARGUMENT 1
#define ONNX_NF4_ENCODER_NOT_FINITE 2 /* the input holds NaN or +-Inf (float64: a value beyond float32) */
#define ONNX_NF4_ENCODER_OUT_OF_MEMORY 3
#define ONNX_NF4_ENCODER_INTERNAL_ERROR 4

/* Flat layout (onnx_nf4.codec.quantize_blockwise): n contiguous elements at src, blocks of block_size
 * consecutive elements, the last one possibly partial. packed: uint8[(n + 1) / 2] (an odd n ends with the low
 * nibble 7); absmax: float32[ceil(n / block_size)]. block_size: a power of two in [16, 4096]. */
int onnx_nf4_encode_flat(const void* src, int32_t dtype, int64_t n, int64_t block_size, int32_t rounding,
                         int32_t threads, uint8_t* packed, float* absmax, double* sums);

/* MatMulNF4 layout (onnx_nf4.codec.layout.quantize_weight): W[K, N] at src, element (k, n) at
 * src + (k * stride_k + n * stride_n) elements (any strides, negative ones too). Column n of W is zero-padded to
 * k_blocks * block_size (k_blocks = ceil(K / block_size)); padding codes are 7 and do not count in the absmax or
 * the sums. packed: uint8[N, k_blocks, block_size / 2]; absmax: float32[N, k_blocks]. */
int onnx_nf4_encode_weight(const void* src, int32_t dtype, int64_t K, int64_t N, int64_t stride_k, int64_t stride_n,
                           int64_t block_size, int32_t rounding, int32_t threads, uint8_t* packed, float* absmax,
                           double* sums);

/* A static English description of a status code. */
const char* onnx_nf4_encoder_status_string(int status);

/* The instruction set the encoder runs: "avx512", "avx2" or "portable". */
const char* onnx_nf4_encoder_isa(void);

#ifdef __cplusplus
}
#endif

#endif /* ONNX_NF4_NF4_ENCODER_API_H_ */
