// cuda_runtime.h of the emulation build: matmul_nf4.cu includes <cuda_runtime.h>, and the emulation puts this
// directory first on the include path, so the kernels and the launcher see the emulator instead of CUDA.
#ifndef ONNX_NF4_CUDA_EMU_RUNTIME_H_
#define ONNX_NF4_CUDA_EMU_RUNTIME_H_

#ifndef ONNX_NF4_CUDA_EMU
#error "custom_ops/cuda/emu is on the include path of a build without ONNX_NF4_CUDA_EMU"
#endif

#include "cuda_emu.h"

#endif  // ONNX_NF4_CUDA_EMU_RUNTIME_H_
