# cuda.cmake: the CUDA part of libonnx_nf4_ops (included by CMakeLists.txt once target onnx_nf4_ops exists).
#
# ONNX_NF4_CUDA (cache, AUTO | ON | OFF):
#   AUTO  build the CUDA kernels and the CUDA execution provider's MatMulNF4 when nvcc is found (CUDACXX,
#         CMAKE_CUDA_COMPILER, PATH or the usual install locations); otherwise skip them with a message;
#   ON    the same, but a missing nvcc is an error;
#   OFF   CPU only.
# The CUDA runtime is linked statically; code for sm_80 and sm_90 plus PTX of compute_90 (JIT for newer GPUs).
# Whatever the outcome, matmul_nf4.cu and nf4_codebook.h are installed under onnx_nf4/kernels/ for the CuPy
# backend, which compiles them at run time with NVRTC.

set(ONNX_NF4_CUDA "AUTO" CACHE STRING "Build the CUDA kernels: AUTO (when nvcc is found), ON or OFF")
set_property(CACHE ONNX_NF4_CUDA PROPERTY STRINGS AUTO ON OFF)
set(ONNX_NF4_CUDA_ARCHITECTURES "80-real;90-real;90-virtual" CACHE STRING
    "CUDA architectures of the kernels (CMake CUDA_ARCHITECTURES syntax)")

set(_onnx_nf4_cuda_dir "${CMAKE_CURRENT_SOURCE_DIR}/cuda")

if(SKBUILD)
  set(_onnx_nf4_kernels_dest "onnx_nf4/kernels")
else()
  set(_onnx_nf4_kernels_dest "share/onnx_nf4/kernels")
endif()
install(FILES "${_onnx_nf4_cuda_dir}/matmul_nf4.cu" "${CMAKE_CURRENT_SOURCE_DIR}/include/onnx_nf4/nf4_codebook.h"
        DESTINATION "${_onnx_nf4_kernels_dest}")

if(ONNX_NF4_CUDA STREQUAL "OFF")
  message(STATUS "onnx_nf4: CUDA kernels disabled (ONNX_NF4_CUDA=OFF)")
  return()
endif()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  if(ONNX_NF4_CUDA STREQUAL "ON")
    message(FATAL_ERROR "onnx_nf4: ONNX_NF4_CUDA=ON but no CUDA compiler (nvcc) was found; set CUDACXX")
  endif()
  message(STATUS "onnx_nf4: no CUDA compiler (nvcc) found: building the CPU kernels only")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES ${ONNX_NF4_CUDA_ARCHITECTURES})
endif()
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

# The kernels form a static library of their own, so that the C++ options of onnx_nf4_ops never reach nvcc.
add_library(onnx_nf4_cuda_kernels STATIC "${_onnx_nf4_cuda_dir}/matmul_nf4.cu")
target_include_directories(onnx_nf4_cuda_kernels PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/include" "${_onnx_nf4_cuda_dir}")
set_target_properties(onnx_nf4_cuda_kernels PROPERTIES
  CUDA_ARCHITECTURES "${ONNX_NF4_CUDA_ARCHITECTURES}"
  CUDA_RUNTIME_LIBRARY Static
  CUDA_SEPARABLE_COMPILATION OFF
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden)
# -O3 for the host part too; the kernels round explicitly where the rounding matters (__fmul_rn / __fadd_rn).
target_compile_options(onnx_nf4_cuda_kernels PRIVATE -O3)

target_sources(onnx_nf4_ops PRIVATE src/cuda_op.cc)
target_include_directories(onnx_nf4_ops PRIVATE "${_onnx_nf4_cuda_dir}")
target_compile_definitions(onnx_nf4_ops PRIVATE ONNX_NF4_WITH_CUDA)
# The static CUDA runtime and its system libraries (dl, pthread, rt) are linked explicitly: -Wl,-z,defs holds.
target_link_libraries(onnx_nf4_ops PRIVATE onnx_nf4_cuda_kernels CUDA::cudart_static)
message(STATUS "onnx_nf4: CUDA kernels enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${ONNX_NF4_CUDA_ARCHITECTURES})")
