// nf4_encoder.cc: the driver of the NF4 encoder and its exported C entry points (nf4_encoder_api.h).
//
// It validates the arguments, picks the instruction-set module (nf4_encoder.h), splits the output into work units
// of about kUnitElements elements and runs them on std::threads that take units from a shared counter. The unit
// split depends only on the shapes, strides and element type, and each unit sums its squares in its own lanes,
// added in unit order at the end: the result is the same bytes and the same sums for every thread count and ISA.
//
// Paths of the MatMulNF4 layout (column n of W[K, N] is the run of blocks of row n of the output):
// * "direct": float32 with contiguous columns (stride_k == 1): complete blocks are encoded in place;
// * "columns": other element types with stride_k == 1: runs of a column are widened into a panel first;
// * "tiles": anything else (a row-major W, stride_n == 1, is the usual case): tiles of kTileColumns columns by
//   one block of rows are transposed into a panel ([column][block_size]) and encoded there.
// The last block of a column is zero-padded in the panel; its padding codes are forced to 7.
#include "nf4_encoder.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#include "cpu_isa.h"
#include "onnx_nf4/nf4_encoder_api.h"

#if defined(_WIN32)
#define ONNX_NF4_ENCODER_EXPORT __declspec(dllexport)
#else
#define ONNX_NF4_ENCODER_EXPORT __attribute__((visibility("default")))
#endif

namespace onnx_nf4::encoder {
namespace {

constexpr int64_t kUnitElements = int64_t{1} << 18;   // elements per work unit
constexpr int64_t kPanelElements = int64_t{1} << 14;  // float32 panel of one worker (grown to 8 blocks if needed)
constexpr int64_t kMaxTileColumns = 64;
constexpr int64_t kOutputLine = 64;  // bytes
constexpr int32_t kMaxThreads = 1024;

// The best encoder this CPU runs at or below the ONNX_NF4_CPU_ISA cap (cpu_isa.h; the encoder has no VNNI code,
// so avx2vnni means the AVX2 encoder).
const EncoderKernels& Select() {
  [[maybe_unused]] const cpu::IsaLevel cap = cpu::IsaCap();
#if defined(ONNX_NF4_HAVE_AVX512)
  if (cap >= cpu::IsaLevel::kAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c")) {
    return Avx512Encoder();
  }
#endif
#if defined(ONNX_NF4_HAVE_AVX2)
  if (cap >= cpu::IsaLevel::kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return Avx2Encoder();
  }
#endif
  return PortableEncoder();
}

const EncoderKernels& Kernels() {
  static const EncoderKernels& selected = Select();
  return selected;
}

int64_t ItemSize(int32_t dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    case kFloat64: return 8;
    default: return 0;
  }
}

bool ValidBlockSize(int64_t bs) { return bs >= 16 && bs <= 4096 && (bs & (bs - 1)) == 0; }

// a * b without overflow, for a, b >= 0.
bool ProductFits(int64_t a, int64_t b) { return a == 0 || b <= std::numeric_limits<int64_t>::max() / a; }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Path { kFlat, kDirect, kColumns, kTiles };

// One call: the input, the output and the work split.
struct Job {
  const EncoderKernels* kernels = nullptr;
  Path path = Path::kFlat;
  const char* src = nullptr;
  int32_t dtype = kFloat32;
  int64_t item = 4;
  int64_t bs = 0;
  int32_t rounding = kOnnxruntime;
  uint8_t* packed = nullptr;
  float* absmax = nullptr;
  bool sums = false;
  int64_t panel_elements = kPanelElements;
  // Flat: n elements, full_blocks complete blocks split into units of unit_blocks.
  int64_t n = 0, full_blocks = 0, unit_blocks = 0;
  // Weight: W[K, N], element (k, n) at src + (k * sk + n * sn) * item; units of unit_cols x unit_kbs blocks.
  int64_t K = 0, N = 0, sk = 0, sn = 0, k_blocks = 0;
  int64_t unit_cols = 0, unit_kbs = 0, kb_units = 0, tile_cols = 0;
  int64_t units = 0;

  const void* At(int64_t index) const { return src + index * item; }
};

// Flat layout: blocks [b0, b1) of the contiguous input.
bool FlatUnit(const Job& job, int64_t b0, int64_t b1, float* panel, ErrorLanes* lanes) {
  const int64_t bs = job.bs;
  BlockRun run;
  run.block_size = bs;
  run.valid = bs;
  run.rounding = job.rounding;
  run.sums = lanes;
  run.x_stride = bs;
  run.packed_stride = bs / 2;
  run.absmax_stride = 1;
  const int64_t chunk_blocks = job.dtype == kFloat32 ? b1 - b0 : std::max<int64_t>(1, job.panel_elements / bs);
  for (int64_t b = b0; b < b1; b += chunk_blocks) {
    const int64_t count = std::min(chunk_blocks, b1 - b);
    if (job.dtype == kFloat32) {
      run.x = reinterpret_cast<const float*>(job.At(b * bs));
    } else {
      GatherArgs g;
      g.src = job.At(b * bs);
      g.dtype = job.dtype;
      g.rows = count * bs;
      g.cols = 1;
      g.stride_r = 1;
      g.dst = panel;
      g.ld = count * bs;
      job.kernels->gather(g);
      run.x = panel;
    }
    run.count = count;
    run.packed = job.packed + b * bs / 2;
    run.absmax = job.absmax + b;
    if (!job.kernels->encode(run)) return false;
  }
  return true;
}

// MatMulNF4 layout, stride_k == 1: blocks [kb0, kb1) of column n.
bool ColumnRun(const Job& job, int64_t n, int64_t kb0, int64_t kb1, float* panel, ErrorLanes* lanes) {
  const int64_t bs = job.bs, K = job.K;
  BlockRun run;
  run.block_size = bs;
  run.rounding = job.rounding;
  run.sums = lanes;
  run.x_stride = bs;
  run.packed_stride = bs / 2;
  run.absmax_stride = 1;
  const int64_t chunk_blocks = job.path == Path::kDirect ? kb1 - kb0 : std::max<int64_t>(1, job.panel_elements / bs);
  for (int64_t kb = kb0; kb < kb1; kb += chunk_blocks) {
    const int64_t kb_end = std::min(kb1, kb + chunk_blocks);
    const int64_t rows = std::min(K, kb_end * bs) - kb * bs;
    const int64_t complete = rows / bs;
    uint8_t* packed = job.packed + (n * job.k_blocks + kb) * (bs / 2);
    float* absmax = job.absmax + n * job.k_blocks + kb;
    const float* x = nullptr;
    if (job.path == Path::kDirect && complete > 0) {
      x = reinterpret_cast<const float*>(job.At(n * job.sn + kb * bs));
    } else {
      GatherArgs g;
      g.src = job.At(n * job.sn + kb * bs);
      g.dtype = job.dtype;
      g.rows = rows;
      g.cols = 1;
      g.stride_r = 1;
      g.dst = panel;
      g.ld = (kb_end - kb) * bs;
      job.kernels->gather(g);
      std::memset(panel + rows, 0, sizeof(float) * ((kb_end - kb) * bs - rows));
      x = panel;
    }
    run.x = x;
    if (complete > 0) {
      run.count = complete;
      run.valid = bs;
      run.packed = packed;
      run.absmax = absmax;
      if (!job.kernels->encode(run)) return false;
    }
    if (complete * bs < rows) {  // the zero-padded last block of the column
      if (x != panel) {
        GatherArgs g;
        g.src = job.At(n * job.sn + (kb + complete) * bs);
        g.dtype = job.dtype;
        g.rows = rows - complete * bs;
        g.cols = 1;
        g.stride_r = 1;
        g.dst = panel;
        g.ld = bs;
        job.kernels->gather(g);
        std::memset(panel + g.rows, 0, sizeof(float) * (bs - g.rows));
        run.x = panel;
      } else {
        run.x = panel + complete * bs;
      }
      run.count = 1;
      run.valid = rows - complete * bs;
      run.packed = packed + complete * (bs / 2);
      run.absmax = absmax + complete;
      if (!job.kernels->encode(run)) return false;
    }
  }
  return true;
}

// MatMulNF4 layout, any strides: columns [c0, c1) x blocks [kb0, kb1) through transposed panels.
bool TileUnit(const Job& job, int64_t c0, int64_t c1, int64_t kb0, int64_t kb1, float* panel, ErrorLanes* lanes) {
  const int64_t bs = job.bs;
  BlockRun run;
  run.block_size = bs;
  run.rounding = job.rounding;
  run.sums = lanes;
  run.x = panel;
  run.x_stride = bs;
  run.packed_stride = job.k_blocks * (bs / 2);
  run.absmax_stride = job.k_blocks;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t rows = std::min(bs, job.K - kb * bs);
    for (int64_t t0 = c0; t0 < c1; t0 += job.tile_cols) {
      const int64_t cols = std::min(job.tile_cols, c1 - t0);
      GatherArgs g;
      g.src = job.At(kb * bs * job.sk + t0 * job.sn);
      g.dtype = job.dtype;
      g.rows = rows;
      g.cols = cols;
      g.stride_r = job.sk;
      g.stride_t = job.sn;
      g.dst = panel;
      g.ld = bs;
      g.prefetch = job.tile_cols * job.sn;  // the same rows of the next tile
      job.kernels->gather(g);
      if (rows < bs) {
        for (int64_t t = 0; t < cols; ++t) std::memset(panel + t * bs + rows, 0, sizeof(float) * (bs - rows));
      }
      run.count = cols;
      run.valid = rows;
      run.packed = job.packed + (t0 * job.k_blocks + kb) * (bs / 2);
      run.absmax = job.absmax + t0 * job.k_blocks + kb;
      if (!job.kernels->encode(run)) return false;
    }
  }
  return true;
}

bool RunUnit(const Job& job, int64_t u, float* panel, ErrorLanes* lanes) {
  if (job.path == Path::kFlat) {
    const int64_t b0 = u * job.unit_blocks;
    return FlatUnit(job, b0, std::min(job.full_blocks, b0 + job.unit_blocks), panel, lanes);
  }
  const int64_t c0 = (u / job.kb_units) * job.unit_cols, c1 = std::min(job.N, c0 + job.unit_cols);
  const int64_t kb0 = (u % job.kb_units) * job.unit_kbs, kb1 = std::min(job.k_blocks, kb0 + job.unit_kbs);
  if (job.path == Path::kTiles) return TileUnit(job, c0, c1, kb0, kb1, panel, lanes);
  for (int64_t n = c0; n < c1; ++n) {
    if (!ColumnRun(job, n, kb0, kb1, panel, lanes)) return false;
  }
  return true;
}

// The partial last block of the flat layout (n % block_size elements), on the calling thread: the onnxruntime
// rule multiplies by the reciprocal as for a complete block, bitsandbytes divides by max(absmax, 1e-38).
bool FlatTail(const Job& job, float* panel, ErrorLanes* lanes) {
  const int64_t bs = job.bs, start = job.full_blocks * bs, count = job.n - start;
  GatherArgs g;
  g.src = job.At(start);
  g.dtype = job.dtype;
  g.rows = count;
  g.cols = 1;
  g.stride_r = 1;
  g.dst = panel;
  g.ld = bs;
  GatherRect(g, 0, count, 0, 1);
  uint32_t max_bits = 0;
  for (int64_t j = 0; j < count; ++j) max_bits = std::max(max_bits, BitsOfFloat(panel[j]) & kAbsMask);
  if (max_bits >= kNotFiniteBits) return false;
  const float absmax = FloatFromBits(max_bits);
  const float* bounds = job.rounding == kBitsandbytes ? kBnbBounds : kOrtBounds;
  const float inv = ScaleInverse(absmax, job.rounding);
  const float divisor = absmax > kBnbTinyScale ? absmax : kBnbTinyScale;
  uint8_t* out = job.packed + start / 2;
  for (int64_t j = 0; j < count; ++j) {
    const float x = panel[j];
    const float s = job.rounding == kBitsandbytes ? x / divisor : x * inv;
    int code = 0;
    for (int i = 0; i < ONNX_NF4_NUM_THRESHOLDS; ++i) code += s > bounds[i];
    if (j % 2 == 0) {
      out[j / 2] = static_cast<uint8_t>(code << 4 | ONNX_NF4_ZERO_CODE);
    } else {
      out[j / 2] = static_cast<uint8_t>((out[j / 2] & 0xF0) | code);
    }
    if (lanes != nullptr) {
      const float decoded = kCodebook[code] * absmax;
      const double diff = static_cast<double>(x) - static_cast<double>(decoded);
      lanes->err[j % kErrorLanes] += diff * diff;
      lanes->ref[j % kErrorLanes] += static_cast<double>(x) * x;
    }
  }
  job.absmax[job.full_blocks] = absmax;
  return true;
}

int Run(Job& job, int32_t threads, double* sums) {
  job.kernels = &Kernels();
  job.sums = sums != nullptr;
  job.panel_elements = std::max(kPanelElements, 8 * job.bs);
  const bool tail = job.path == Path::kFlat && job.full_blocks * job.bs < job.n;
  std::vector<ErrorLanes> lanes(job.sums ? job.units + 1 : 0, ErrorLanes{});
  int64_t workers = threads > 0 ? threads : static_cast<int64_t>(std::thread::hardware_concurrency());
  workers = std::max<int64_t>(1, std::min(workers, job.units));
  std::vector<float> panels(static_cast<size_t>(workers * (job.panel_elements + 16)));
  auto panel_of = [&](int64_t w) {
    float* p = panels.data() + w * (job.panel_elements + 16);
    const auto misalign = reinterpret_cast<uintptr_t>(p) % 64;
    return misalign ? p + (64 - misalign) / sizeof(float) : p;
  };
  std::atomic<int64_t> next{0};
  std::atomic<bool> not_finite{false};
  auto work = [&](int64_t w) {
    float* panel = panel_of(w);
    for (int64_t u = next.fetch_add(1); u < job.units && !not_finite.load(std::memory_order_relaxed);
         u = next.fetch_add(1)) {
      if (!RunUnit(job, u, panel, job.sums ? &lanes[u] : nullptr)) not_finite.store(true);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  for (int64_t w = 1; w < workers; ++w) {
    try {
      pool.emplace_back(work, w);
    } catch (const std::exception&) {
      break;  // fewer threads: the others take the remaining units
    }
  }
  work(0);
  for (std::thread& t : pool) t.join();
  if (!not_finite && tail && !FlatTail(job, panel_of(0), job.sums ? &lanes[job.units] : nullptr)) not_finite = true;
  if (not_finite) return ONNX_NF4_ENCODER_NOT_FINITE;
  if (sums != nullptr) {
    sums[0] = sums[1] = 0.0;
    for (const ErrorLanes& unit : lanes) {
      double err = 0.0, ref = 0.0;
      for (int i = 0; i < kErrorLanes; ++i) {
        err += unit.err[i];
        ref += unit.ref[i];
      }
      sums[0] += err;
      sums[1] += ref;
    }
  }
  return ONNX_NF4_ENCODER_OK;
}

bool CommonArgsValid(int32_t dtype, int64_t block_size, int32_t rounding, int32_t threads) {
  return ItemSize(dtype) != 0 && ValidBlockSize(block_size) &&
         (rounding == kOnnxruntime || rounding == kBitsandbytes) && threads >= 0 && threads <= kMaxThreads;
}

template <typename F>
int Guarded(F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ONNX_NF4_ENCODER_OUT_OF_MEMORY;
  } catch (...) {
    return ONNX_NF4_ENCODER_INTERNAL_ERROR;
  }
}

}  // namespace
}  // namespace onnx_nf4::encoder

using namespace onnx_nf4::encoder;  // NOLINT(build/namespaces): the C entry points below

extern "C" ONNX_NF4_ENCODER_EXPORT int onnx_nf4_encode_flat(const void* src, int32_t dtype, int64_t n,
                                                            int64_t block_size, int32_t rounding, int32_t threads,
                                                            uint8_t* packed, float* absmax, double* sums) {
  if (!CommonArgsValid(dtype, block_size, rounding, threads) || n < 0) return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  if (n > 0 && (src == nullptr || packed == nullptr || absmax == nullptr)) return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  if (!ProductFits(n, ItemSize(dtype))) return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  return Guarded([&] {
    Job job;
    job.path = Path::kFlat;
    job.src = static_cast<const char*>(src);
    job.dtype = dtype;
    job.item = ItemSize(dtype);
    job.bs = block_size;
    job.rounding = rounding;
    job.packed = packed;
    job.absmax = absmax;
    job.n = n;
    job.full_blocks = n / block_size;
    job.unit_blocks = std::max<int64_t>(1, kUnitElements / block_size);
    job.units = CeilDiv(job.full_blocks, job.unit_blocks);
    if (sums != nullptr) sums[0] = sums[1] = 0.0;
    if (n == 0) return ONNX_NF4_ENCODER_OK;
    return Run(job, threads, sums);
  });
}

extern "C" ONNX_NF4_ENCODER_EXPORT int onnx_nf4_encode_weight(const void* src, int32_t dtype, int64_t K, int64_t N,
                                                              int64_t stride_k, int64_t stride_n, int64_t block_size,
                                                              int32_t rounding, int32_t threads, uint8_t* packed,
                                                              float* absmax, double* sums) {
  if (!CommonArgsValid(dtype, block_size, rounding, threads) || K < 0 || N < 0) {
    return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  }
  const int64_t k_blocks = CeilDiv(K, block_size);
  const int64_t item = ItemSize(dtype);
  // Every index and byte count below must fit in int64.
  const int64_t max_k = K > 0 ? K - 1 : 0, max_n = N > 0 ? N - 1 : 0;
  const int64_t ask = stride_k == std::numeric_limits<int64_t>::min() ? -1 : (stride_k < 0 ? -stride_k : stride_k);
  const int64_t asn = stride_n == std::numeric_limits<int64_t>::min() ? -1 : (stride_n < 0 ? -stride_n : stride_n);
  if (ask < 0 || asn < 0 || !ProductFits(ask, max_k) || !ProductFits(asn, max_n) ||
      ask * max_k > std::numeric_limits<int64_t>::max() - asn * max_n ||
      !ProductFits(ask * max_k + asn * max_n + 1, item) || !ProductFits(k_blocks, block_size) ||
      !ProductFits(N, k_blocks * block_size)) {
    return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  }
  if (K > 0 && N > 0 && (src == nullptr || packed == nullptr || absmax == nullptr)) {
    return ONNX_NF4_ENCODER_INVALID_ARGUMENT;
  }
  return Guarded([&] {
    if (sums != nullptr) sums[0] = sums[1] = 0.0;
    if (K == 0 || N == 0) return ONNX_NF4_ENCODER_OK;
    Job job;
    job.src = static_cast<const char*>(src);
    job.dtype = dtype;
    job.item = item;
    job.bs = block_size;
    job.rounding = rounding;
    job.packed = packed;
    job.absmax = absmax;
    job.K = K;
    job.N = N;
    job.sk = stride_k;
    job.sn = stride_n;
    job.k_blocks = k_blocks;
    const int64_t column = k_blocks * block_size;
    if (stride_k == 1 || K == 1) {
      job.path = dtype == kFloat32 ? Path::kDirect : Path::kColumns;
      job.sk = 1;
      if (column >= kUnitElements) {
        job.unit_cols = 1;
        job.unit_kbs = CeilDiv(kUnitElements, block_size);
      } else {
        job.unit_kbs = k_blocks;
        job.unit_cols = kUnitElements / column;
      }
    } else {
      job.path = Path::kTiles;
      job.tile_cols = std::clamp<int64_t>(kPanelElements / block_size, 8, kMaxTileColumns);
      // A unit spans few block rows and many columns, so that each of its rows of W is read sequentially
      // (few pages at a time) and each column's output of the unit fills at least a cache line.
      job.unit_kbs = std::max<int64_t>(1, kOutputLine / (block_size / 2));
      const int64_t tiles = std::max<int64_t>(1, kUnitElements / (job.unit_kbs * block_size * job.tile_cols));
      job.unit_cols = std::min(tiles * job.tile_cols, N);
    }
    job.kb_units = CeilDiv(k_blocks, job.unit_kbs);
    job.units = CeilDiv(N, job.unit_cols) * job.kb_units;
    return Run(job, threads, sums);
  });
}

extern "C" ONNX_NF4_ENCODER_EXPORT const char* onnx_nf4_encoder_status_string(int status) {
  switch (status) {
    case ONNX_NF4_ENCODER_OK: return "ok";
    case ONNX_NF4_ENCODER_INVALID_ARGUMENT: return "invalid argument";
    case ONNX_NF4_ENCODER_NOT_FINITE: return "the input holds NaN or Inf (or a float64 value beyond float32)";
    case ONNX_NF4_ENCODER_OUT_OF_MEMORY: return "out of memory";
    case ONNX_NF4_ENCODER_INTERNAL_ERROR: return "internal error";
    default: return "unknown status";
  }
}

extern "C" ONNX_NF4_ENCODER_EXPORT const char* onnx_nf4_encoder_isa(void) { return Kernels().name; }
