// matmul_nf4_cpu_op.cc: the MatMulNF4 kernel of the CPU execution provider.
//
// Validates every attribute at session creation and every input at each call (matmul_nf4_args.h) before
// reading data, converts float16 / bfloat16 A and bias to float32, runs the dispatched kernel set
// (cpu_kernels.h) on the session's intra-op thread pool and converts Y back. Errors become onnxruntime
// statuses; no exception leaves the library.
#include "matmul_nf4_cpu_op.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "matmul_nf4_args.h"
#include "matmul_nf4_op.h"

namespace onnx_nf4 {
namespace {

// Runs the kernel's parallel loops on the session's intra-op thread pool, or on this thread when the loop is small
// (cpu::kMinParallelWork).
class OrtParallelRunner final : public cpu::ParallelRunner {
 public:
  explicit OrtParallelRunner(const Ort::KernelContext& ctx) : ctx_(ctx) {}
  void For(size_t total, int64_t work, void (*fn)(void*, size_t), void* data) const override {
    if (total <= 1 || work < cpu::kMinParallelWork) {
      for (size_t i = 0; i < total; ++i) fn(data, i);
      return;
    }
    ctx_.ParallelFor(fn, total, 0, data);
  }

 private:
  const Ort::KernelContext& ctx_;
};

// Scratch memory kept by one thread between the calls it makes: one 64-byte aligned block, grown to what the
// largest call so far needed (up to kMaxKeptBytes). Calls on different threads (concurrent Run calls) use different
// arenas; a call that finds its thread's arena busy (it cannot happen in onnxruntime, which runs one kernel at a
// time per thread, but costs nothing to guard) uses the heap.
struct ThreadArena {
  static constexpr size_t kAlign = 64;
  static constexpr size_t kMaxKeptBytes = size_t{64} << 20;  // larger needs are freed after their call
  std::unique_ptr<char[]> storage;
  char* base = nullptr;  // storage, aligned
  size_t capacity = 0;
  bool busy = false;

  void Reserve(size_t bytes) {
    storage.reset();
    capacity = 0;
    storage.reset(new char[bytes + kAlign]);
    const auto addr = reinterpret_cast<uintptr_t>(storage.get());
    base = storage.get() + (kAlign - addr % kAlign) % kAlign;
    capacity = bytes;
  }
};

thread_local ThreadArena t_arena;

// The scratch buffers of one call: carved from the thread's arena while they fit, else from the heap (freed when
// the call returns); a call that overflowed grows the arena for the next one, so the steady state allocates nothing.
class CallScratch final : public cpu::Scratch {
 public:
  CallScratch() : arena_(t_arena.busy ? nullptr : &t_arena) {
    if (arena_ != nullptr) arena_->busy = true;
  }
  ~CallScratch() {
    if (arena_ == nullptr) return;
    if (needed_ > arena_->capacity && needed_ <= ThreadArena::kMaxKeptBytes) {
      try {
        arena_->Reserve(needed_);
      } catch (const std::bad_alloc&) {  // keep going without: the next call uses the heap again
      }
    }
    arena_->busy = false;
  }
  CallScratch(const CallScratch&) = delete;
  CallScratch& operator=(const CallScratch&) = delete;

  void* Zeroed(size_t bytes) override { return Allocate(bytes, true); }
  void* Uninitialized(size_t bytes) override { return Allocate(bytes, false); }

 private:
  void* Allocate(size_t bytes, bool zero) {
    constexpr size_t kAlign = ThreadArena::kAlign;
    const size_t size = (bytes + kAlign - 1) / kAlign * kAlign;
    needed_ += size;
    char* data;
    if (arena_ != nullptr && used_ + size <= arena_->capacity) {
      data = arena_->base + used_;
      used_ += size;
    } else {
      std::unique_ptr<char[]> buf(new char[size + kAlign]);
      const auto addr = reinterpret_cast<uintptr_t>(buf.get());
      data = buf.get() + (kAlign - addr % kAlign) % kAlign;
      heap_.push_back(std::move(buf));
    }
    if (zero) std::memset(data, 0, bytes);
    return data;
  }

  ThreadArena* arena_;
  size_t used_ = 0;    // bytes of the arena handed out
  size_t needed_ = 0;  // bytes this call asked for in all
  std::vector<std::unique_ptr<char[]>> heap_;
};

// float16 / bfloat16 -> float32 by the onnxruntime header types (the way back, T(float), rounds to nearest
// even).
template <typename T>
std::vector<float> ToFloatVector(const T* src, size_t count) {
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = src[i].ToFloat();
  return out;
}

template <typename T>
class MatMulNF4CpuKernel final : public MatMulNF4Kernel<MatMulNF4CpuKernel<T>> {
 public:
  using MatMulNF4Kernel<MatMulNF4CpuKernel<T>>::MatMulNF4Kernel;

  static constexpr const char* kExecutionProvider = "CPUExecutionProvider";

  // One validated call with at least one row of A (MatMulNF4Kernel::ComputeV2); y_value is the allocated Y.
  void Compute(const Ort::KernelContext& ctx, const MatMulNF4Shapes& s, Ort::UnownedValue& y_value) const {
    const MatMulNF4Attrs& attrs = this->attrs_;
    const int64_t K = attrs.K, N = attrs.N;

    cpu::Problem p;
    p.M = s.M;
    p.int8_activations = attrs.accuracy_level == 4;
    cpu::Nf4Weight& w = p.w;
    w.K = K;
    w.N = N;
    w.block_size = attrs.block_size;
    w.k_blocks = attrs.k_blocks;
    w.packed = ctx.GetInput(kInputB).GetTensorData<uint8_t>();
    if (s.double_quant) {
      w.absmax_codes = ctx.GetInput(kInputAbsmax).GetTensorData<uint8_t>();
      w.nested_absmax = ctx.GetInput(kInputNestedAbsmax).GetTensorData<float>();
      w.nested_code = ctx.GetInput(kInputNestedCode).GetTensorData<float>();
      w.absmax_offset = ctx.GetInput(kInputAbsmaxOffset).GetTensorData<float>()[0];
      w.nested_block_size = attrs.nested_block_size;
    } else {
      w.absmax = ctx.GetInput(kInputAbsmax).GetTensorData<float>();
    }

    const T* a = ctx.GetInput(kInputA).GetTensorData<T>();
    const T* bias = s.has_bias ? ctx.GetInput(kInputBias).GetTensorData<T>() : nullptr;
    T* y = y_value.GetTensorMutableData<T>();
    const size_t a_count = static_cast<size_t>(s.M * K), y_count = static_cast<size_t>(s.M * N);

    std::vector<float> a_f32, bias_f32, y_f32;
    if constexpr (std::is_same_v<T, float>) {
      p.A = a;
      p.bias = bias;
      p.Y = y;
    } else {
      a_f32 = ToFloatVector(a, a_count);
      p.A = a_f32.data();
      if (bias != nullptr) {
        bias_f32 = ToFloatVector(bias, static_cast<size_t>(N));
        p.bias = bias_f32.data();
      }
      y_f32.resize(y_count);
      p.Y = y_f32.data();
    }

    const cpu::KernelSet& kernels = cpu::Dispatch();
    OrtParallelRunner runner(ctx);
    CallScratch scratch;
    (p.int8_activations ? kernels.matmul_int8 : kernels.matmul_f32)(p, runner, scratch);

    if constexpr (!std::is_same_v<T, float>) {
      for (size_t i = 0; i < y_count; ++i) y[i] = T(y_f32[i]);
    }
  }
};

}  // namespace

void RegisterCpuOps(Ort::CustomOpDomain& domain) {
  static MatMulNF4Op<MatMulNF4CpuKernel<float>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> op_f32;
  static MatMulNF4Op<MatMulNF4CpuKernel<Ort::Float16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> op_f16;
  static MatMulNF4Op<MatMulNF4CpuKernel<Ort::BFloat16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16> op_bf16;
  domain.Add(&op_f32);
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
}

}  // namespace onnx_nf4
