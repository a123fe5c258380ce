// emu_main.cc: the emulation build of matmul_nf4.cu (one translation unit, a shared library for ctypes).
//
// Built by the tests (tests/cuda_emu.py) with the host compiler:
//   g++ -std=c++17 -O1 -ffp-contract=off -fPIC -shared -DONNX_NF4_CUDA_EMU
//       -I custom_ops/cuda/emu -I custom_ops/cuda -I custom_ops/include custom_ops/cuda/emu/emu_main.cc
// (custom_ops/cuda/emu first, so that the .cu's <cuda_runtime.h> is the emulator). It holds the real kernels and
// the real launcher LaunchMatMulNF4, the C entry points below, and a few probe kernels that exercise single
// emulated instructions and the emulator's error reports.
#include "matmul_nf4.cu"

namespace onnx_nf4 {
namespace gpu {

// One mma16816 of the warp: lane l passes a[4 l .. 4 l + 3], b[2 l], b[2 l + 1], c[4 l ..] and gets d[4 l ..].
template <typename T>
__global__ void emu_probe_mma(const u32* a, const u32* b, const float* c, float* d) {
  const int l = threadIdx.x;
  const u32 ar[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
  float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
  mma16816(static_cast<T*>(nullptr), acc, ar, b[2 * l], b[2 * l + 1]);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}

// ldmatrix_x4 of a 64 x 8 tile of 16-bit values copied into shared memory; lane l addresses row rows[l].
__global__ void emu_probe_ldmatrix(const u16* tile, const int* rows, u32* out) {
  __shared__ __align__(16) u16 s_tile[64][8];
  const int l = threadIdx.x;
  for (int i = l; i < 64 * 8; i += 32) s_tile[i / 8][i % 8] = tile[i];
  __syncthreads();
  u32 r[4];
  ldmatrix_x4(r, &s_tile[rows[l]][0]);
  for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}

// The conversions of the kernels over n values.
__global__ void emu_probe_cvt(const float* in, u16* f16_bits, u16* bf16_bits, float* f16_back, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    f16_bits[i] = f32_to_f16_bits(in[i]);
    bf16_bits[i] = f32_to_bf16_bits(in[i]);
    f16 h;
    h.bits = f16_bits[i];
    f16_back[i] = to_float(h);
  }
}

// Kernels that break a rule of the emulation on purpose (kind selects which); out[threadIdx.x] is written.
__global__ void emu_probe_misuse(int kind, const u32* global, u32* out) {
  __shared__ u32 s_val[256];
  const int t = threadIdx.x, lane = t & 31;
  u32 v = static_cast<u32>(t);
  switch (kind) {
    case 0: v = __shfl_sync(0x0000ffffu, v, 0); break;  // partial mask
    case 1:                                             // lanes at different collectives
      if (lane < 16) {
        v = __shfl_sync(kFullMask, v, 0);
      } else {
        v = __shfl_xor_sync(kFullMask, v, 1);
      }
      break;
    case 2:  // a lane leaves while its warp waits
      if (lane == 5) return;
      v = __shfl_sync(kFullMask, v, 0);
      break;
    case 3:  // a warp skips the barrier the others wait at
      if (t >= 32) __syncthreads();
      break;
    case 4:  // two different barriers
      if (t < 32) {
        __syncthreads();
        v += 1;
      } else {
        __syncthreads();
        v *= 3;
      }
      break;
    case 5: {  // a 16-byte load one byte past the start of a buffer (misaligned)
      u32 q[4];
      ld_stream_v4(reinterpret_cast<const u8*>(global) + 1, q);
      v = q[0];
      break;
    }
    case 6: {  // a 16-byte load past the end of the 64-byte buffer
      u32 q[4];
      ld_stream_v4(global + 16, q);
      v = q[0];
      break;
    }
    case 7:  // a shared-memory race: the value read depends on the order threads run in
      s_val[t] = v;
      v = s_val[(t + 37) % 256] + (v << 16);
      break;
    case 8:  // lane 0 of every warp waits at a barrier, the other lanes at a shuffle: nothing can proceed
      if (lane == 0) {
        __syncthreads();
      } else {
        v = __shfl_sync(kFullMask, v, 0);
      }
      break;
    case 9: {  // signed overflow (undefined behaviour, which only the sanitizer build reports)
      const int big = 0x7fffffff - 1;
      v = static_cast<u32>(big + t + 2);
      break;
    }
    default: break;
  }
  out[t] = v;
}

}  // namespace gpu
}  // namespace onnx_nf4

namespace {

namespace gpu = onnx_nf4::gpu;

int TakeError(char* err, size_t err_len, const std::string& error) {
  if (error.empty()) return 0;
  if (err != nullptr && err_len > 0) {
    const size_t n = error.size() < err_len - 1 ? error.size() : err_len - 1;
    error.copy(err, n);
    err[n] = '\0';
  }
  return 1;
}

std::string LastError() { return cudaGetLastError() == cudaSuccess ? "" : cudaGetErrorString(cudaErrorLaunchFailure); }

// The signature every MatMulNF4 kernel has (matmul_nf4.cu).
template <typename T>
using MatmulKernel = void (*)(const T*, const gpu::u8*, const float*, const gpu::u8*, const float*, const float*,
                              const float*, const T*, T*, int, int, int, int, int, int, int, int);

// Launches kernel if `name` is its template-id; args as cuLaunchKernel takes them (args[i] points at parameter i).
template <typename T>
bool LaunchIfNamed(const std::string& name, MatmulKernel<T> kernel, dim3 grid, dim3 block, void** args) {
  if (cuda_emu::detail::KernelName(reinterpret_cast<const void*>(kernel)) != name) return false;
  auto ptr = [&](int i) { return *static_cast<void* const*>(args[i]); };
  auto num = [&](int i) { return *static_cast<const int*>(args[i]); };
  cuda_emu::Launch(kernel, grid, block, nullptr, static_cast<const T*>(ptr(0)), static_cast<const gpu::u8*>(ptr(1)),
                   static_cast<const float*>(ptr(2)), static_cast<const gpu::u8*>(ptr(3)),
                   static_cast<const float*>(ptr(4)), static_cast<const float*>(ptr(5)),
                   static_cast<const float*>(ptr(6)), static_cast<const T*>(ptr(7)), static_cast<T*>(ptr(8)), num(9),
                   num(10), num(11), num(12), num(13), num(14), num(15), num(16));
  return true;
}

template <typename T>
bool LaunchSimtIfNamed(const std::string& name, dim3 grid, dim3 block, void** args) {
  return LaunchIfNamed<T>(name, gpu::nf4_gemv_simt<T, 1>, grid, block, args) ||
         LaunchIfNamed<T>(name, gpu::nf4_gemv_simt<T, 2>, grid, block, args) ||
         LaunchIfNamed<T>(name, gpu::nf4_gemv_simt<T, 4>, grid, block, args) ||
         LaunchIfNamed<T>(name, gpu::nf4_gemv_simt<T, 8>, grid, block, args);
}

template <typename T>
bool LaunchMmaIfNamed(const std::string& name, dim3 grid, dim3 block, void** args) {
  return LaunchIfNamed<T>(name, gpu::nf4_gemv_mma<T, 8>, grid, block, args) ||
         LaunchIfNamed<T>(name, gpu::nf4_gemv_mma<T, 16>, grid, block, args) ||
         LaunchIfNamed<T>(name, gpu::nf4_gemm_mma<T>, grid, block, args);
}

}  // namespace

#define EMU_API extern "C" __attribute__((visibility("default")))

// Forgets the registered buffers, the recorded launches and any pending error.
EMU_API void emu_reset() { cuda_emu::Reset(); }

// sm_count: what cudaDeviceGetAttribute reports; schedule: 0 (lockstep) or 1 (warp-serial, blocks reversed; see
// cuda_emu.h); dry_run: record launches without running them.
EMU_API void emu_configure(int sm_count, int schedule, int dry_run) {
  cuda_emu::detail::EmuState& s = cuda_emu::detail::State();
  s.sm_count = sm_count;
  s.schedule = schedule;
  s.dry_run = dry_run != 0;
}

// [p, p + bytes) is global memory of the next launches (ld.global.nc and __ldg may read it).
EMU_API void emu_add_buffer(const void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  cuda_emu::detail::State().buffers.push_back({a, a + bytes});
}

// [p, p + bytes) is a __shared__ variable of a kernel (poisoned before every block; ldmatrix may read it).
EMU_API void emu_add_shared(void* p, size_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  cuda_emu::detail::State().shared.push_back({a, a + bytes});
}

EMU_API int emu_launch_count() { return static_cast<int>(cuda_emu::detail::State().launches.size()); }

// Launch i: its kernel's template-id into name; grid x, y, z, block x, y, z and then the kernel's arguments into
// values (at most max_values in all). Returns the number of values, -1 for a bad index.
EMU_API int emu_launch_info(int i, char* name, size_t name_len, int64_t* values, int max_values) {
  const auto& launches = cuda_emu::detail::State().launches;
  if (i < 0 || i >= static_cast<int>(launches.size())) return -1;
  const cuda_emu::LaunchRecord& r = launches[i];
  TakeError(name, name_len, r.kernel);
  std::vector<int64_t> v = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z};
  v.insert(v.end(), r.args.begin(), r.args.end());
  const int n = static_cast<int>(v.size()) < max_values ? static_cast<int>(v.size()) : max_values;
  for (int k = 0; k < n; ++k) values[k] = v[k];
  return n;
}

// Completed warp collectives and fiber switches since emu_reset.
EMU_API void emu_stats(uint64_t* collectives, uint64_t* switches) {
  *collectives = cuda_emu::detail::State().collectives;
  *switches = cuda_emu::detail::State().switches;
}

// The library's onnx_nf4_cuda_matmul (custom_ops/src/cuda_op.cc) with the same arguments: LaunchMatMulNF4 on host
// memory, run by the emulator. Returns 0, or 1 with the message in err.
EMU_API int onnx_nf4_cuda_matmul(int dtype, int algo, const void* A, const void* B, const void* absmax,
                                 int absmax_is_codes, const void* nested_absmax, const void* nested_code,
                                 const void* absmax_offset, const void* bias, void* Y, int64_t M, int64_t K, int64_t N,
                                 int64_t block_size, int64_t nested_block_size, void* stream, char* err,
                                 size_t err_len) {
  if (dtype < 0 || dtype > 2) return TakeError(err, err_len, "dtype must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  if (algo < 0 || algo > 2) return TakeError(err, err_len, "algo must be 0 (auto), 1 (CUDA cores) or 2 (tensor cores)");
  gpu::Problem p;
  p.dtype = static_cast<gpu::DType>(dtype);
  p.A = A;
  p.B = static_cast<const uint8_t*>(B);
  if (absmax_is_codes) {
    p.absmax_codes = static_cast<const uint8_t*>(absmax);
    p.nested_absmax = static_cast<const float*>(nested_absmax);
    p.nested_code = static_cast<const float*>(nested_code);
    p.absmax_offset = static_cast<const float*>(absmax_offset);
  } else {
    p.absmax = static_cast<const float*>(absmax);
  }
  p.bias = bias;
  p.Y = Y;
  p.M = M;
  p.K = K;
  p.N = N;
  p.block_size = block_size;
  p.nested_block_size = nested_block_size;
  return TakeError(err, err_len, gpu::LaunchMatMulNF4(p, static_cast<gpu::Algo>(algo), stream));
}

// A kernel by its template-id (as onnx_nf4.op.cupy_backend.kernel_names spells it), launched the way CuPy's
// RawKernel launches it: args[i] points at the value of parameter i. Returns 0, or 1 with the error in err.
EMU_API int emu_launch_kernel(const char* name, unsigned grid_x, unsigned grid_y, unsigned block_x, void** args,
                              char* err, size_t err_len) {
  const std::string n = name;
  const dim3 grid(grid_x, grid_y), block(block_x);
  const bool found =
      LaunchSimtIfNamed<float>(n, grid, block, args) || LaunchSimtIfNamed<gpu::f16>(n, grid, block, args) ||
      LaunchSimtIfNamed<gpu::bf16>(n, grid, block, args) || LaunchMmaIfNamed<gpu::f16>(n, grid, block, args) ||
      LaunchMmaIfNamed<gpu::bf16>(n, grid, block, args);
  if (!found) return TakeError(err, err_len, "no kernel is named " + n);
  return TakeError(err, err_len, LastError());
}

// The probes: each runs one block of `threads` threads and returns 0, or 1 with the emulator's error in err.
EMU_API int emu_probe_mma(int bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d, char* err,
                          size_t err_len) {
  if (bf16) {
    cuda_emu::Launch(gpu::emu_probe_mma<gpu::bf16>, dim3(1), dim3(32), nullptr, a, b, c, d);
  } else {
    cuda_emu::Launch(gpu::emu_probe_mma<gpu::f16>, dim3(1), dim3(32), nullptr, a, b, c, d);
  }
  return TakeError(err, err_len, LastError());
}

EMU_API int emu_probe_ldmatrix(const uint16_t* tile, const int* rows, uint32_t* out, char* err, size_t err_len) {
  cuda_emu::Launch(gpu::emu_probe_ldmatrix, dim3(1), dim3(32), nullptr, tile, rows, out);
  return TakeError(err, err_len, LastError());
}

EMU_API int emu_probe_cvt(const float* in, uint16_t* f16_bits, uint16_t* bf16_bits, float* f16_back, int n, char* err,
                          size_t err_len) {
  cuda_emu::Launch(gpu::emu_probe_cvt, dim3(1), dim3(64), nullptr, in, f16_bits, bf16_bits, f16_back, n);
  return TakeError(err, err_len, LastError());
}

EMU_API int emu_probe_misuse(int kind, int threads, const uint32_t* global, uint32_t* out, char* err, size_t err_len) {
  cuda_emu::Launch(gpu::emu_probe_misuse, dim3(1), dim3(threads), nullptr, kind, global, out);
  return TakeError(err, err_len, LastError());
}
