// cuda_emu.h: a CUDA-semantics emulation that runs the kernels of matmul_nf4.cu on the CPU (docs/gpu.md,
// "Emulation"). Include it in exactly one translation unit (it defines the emulator's state and its context switch),
// before the .cu, with ONNX_NF4_CUDA_EMU defined; custom_ops/cuda/emu/emu_main.cc is that unit.
//
// Execution model:
//   * a launch runs its blocks one at a time (in order, or reversed); every thread of a block is a fiber with a
//     stack of its own, all on the calling OS thread, so a run is deterministic for a given schedule;
//   * a fiber runs until it reaches a warp collective (shuffle, mma, ldmatrix), __syncthreads or its end, then
//     the scheduler resumes the next ready fiber. Schedule 0 (lockstep) visits every ready fiber once per round in
//     thread order: the warps advance together, one collective per round. Schedule 1 (warp-serial) runs the blocks
//     in reverse order and one warp at a time as far as it can go (to a barrier), the warps in a fresh
//     pseudo-random order at every barrier and the lanes in a fresh order at every collective: a warp runs far
//     ahead of the others, so a missing barrier or a read of another warp's unwritten data shows;
//   * a warp collective completes when all 32 lanes have arrived at the same call site with the full mask; a
//     barrier when every live thread of the block has arrived at the same __syncthreads. A partial mask, lanes at
//     different collectives, a lane that exits while its warp waits (or before its warp's next collective), a
//     thread that exits while the block waits at a barrier (or before the block's next barrier), threads at different
//     __syncthreads, and a block where no fiber can run are errors of the launch (reported by cudaGetLastError), never
//     hangs;
//   * __shared__ variables are function-local statics (one block runs at a time); the host registers their
//     extents (emu_add_shared) so that they are filled with 0xff bytes (NaN) before every block and ldmatrix
//     addresses are checked against them. Global loads through ld.global.nc and __ldg are checked for alignment
//     and against the buffers the host registered for the launch (emu_add_buffer);
//   * one emulator state per process: launch from one OS thread at a time. Blocks whose size is not a multiple of
//     32 have a partial last warp, whose collectives never complete (reported as a deadlock).
//
// Arithmetic: float32 operations are the host's IEEE operations (compile with -ffp-contract=off; fmaf is fused);
// cvt to f16 / bf16 rounds to nearest even (NaN -> 0x7fff); mma.m16n8k16 multiplies exactly and adds the 16 products
// and the accumulator in double before one rounding to float32 (a real tensor core rounds differently: see
// docs/gpu.md). Fragment layouts are written as the (thread, value) -> element index maps of CUTLASS's
// SM80_16x8x16 MMA traits and SM75_U32x4_LDSM_N copy traits, which state the PTX ISA's layouts as data.
#ifndef ONNX_NF4_CUDA_EMU_H_
#define ONNX_NF4_CUDA_EMU_H_

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------------------
// CUDA keywords and built-in variables
// ---------------------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define threadIdx (::cuda_emu::detail::CurrentThread()->thread_idx)
#define blockIdx (::cuda_emu::detail::State().block_idx)
#define blockDim (::cuda_emu::detail::State().block_dim)
#define gridDim (::cuda_emu::detail::State().grid_dim)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// ---------------------------------------------------------------------------------------------------------
// Runtime API (the part the launcher uses)
// ---------------------------------------------------------------------------------------------------------

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;  // per fiber, plus a guard page below it

// One launch as the host saw it: the kernel's template-id, its configuration and its arguments (pointers as
// addresses, integers as values), in the kernel's parameter order.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  std::vector<int64_t> args;
};

struct Extent {
  uintptr_t begin, end;
};

namespace detail {

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // lowest usable byte (the guard page lies below)
  uint3 thread_idx = {0, 0, 0};
  int linear = 0;
  enum Status { kReady, kAtWarp, kAtBarrier, kDone } status = kReady;
};

// What a lane brings to a warp collective and what it takes away.
struct LanePayload {
  uint32_t in[10];
  const void* ptr;
  uint32_t out[4];
};

enum class Op : int { kShflIdx, kShflXor, kMmaF16, kMmaBF16, kLdmatrixX4 };

struct WarpState {
  int arrived = 0;
  Op op = Op::kShflIdx;
  const void* site = nullptr;
  LanePayload lanes[kWarpSize];
};

struct EmuState {
  // Configuration (set by the host between launches).
  int sm_count = 108;
  int schedule = 0;  // 0: lockstep, blocks in order; 1: warp-serial, blocks reversed (see the top of this file)
  bool dry_run = false;
  std::vector<Extent> buffers;  // global memory of the launch
  std::vector<Extent> shared;   // the __shared__ variables of the kernels
  std::vector<LaunchRecord> launches;
  std::string error;         // first error since the last cudaGetLastError ("" = none)
  std::string taken_error;   // the error cudaGetLastError returned last (for cudaGetErrorString)
  uint64_t collectives = 0;  // completed warp collectives (statistics)
  uint64_t switches = 0;     // fiber switches (statistics)
  // The block being run.
  uint3 block_idx = {0, 0, 0};
  dim3 block_dim, grid_dim;
  Fiber fibers[kMaxThreads];
  WarpState warps[kMaxThreads / kWarpSize];
  int threads = 0, done = 0, at_barrier = 0;
  const void* barrier_site = nullptr;
  bool aborted = false;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_ctx;
#endif
  Fiber* current = nullptr;
  char* stacks = nullptr;  // kMaxThreads stacks with guard pages, mapped once
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline EmuState& State() {
  static EmuState* state = new EmuState();  // never destroyed: fibers may still point into it at exit
  return *state;
}

inline Fiber* CurrentThread() {
  Fiber* f = State().current;
  if (f == nullptr) {
    std::fprintf(stderr, "cuda_emu: a device built-in was used outside a kernel\n");
    std::abort();
  }
  return f;
}

// ---------------------------------------------------------------------------------------------------------
// Context switch (x86-64 System V: callee-saved registers, MXCSR and the x87 control word; else ucontext)
// ---------------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

[[noreturn]] void FiberEntry();

inline void SwitchToScheduler(Fiber* f) {
  EmuState& s = State();
  ++s.switches;
#if defined(__x86_64__)
  cuda_emu_switch(&f->sp, s.scheduler_sp);
#else
  swapcontext(&f->ctx, &s.scheduler_ctx);
#endif
}

inline void SwitchToFiber(Fiber* f) {
  EmuState& s = State();
  s.current = f;
  ++s.switches;
#if defined(__x86_64__)
  cuda_emu_switch(&s.scheduler_sp, f->sp);
#else
  swapcontext(&s.scheduler_ctx, &f->ctx);
#endif
  s.current = nullptr;
}

inline void MapStacks(EmuState& s) {
  if (s.stacks != nullptr) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackBytes + page;
  void* p =
      mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cuda_emu: cannot map the fiber stacks\n");
    std::abort();
  }
  s.stacks = static_cast<char*>(p);
  for (int i = 0; i < kMaxThreads; ++i) {
    mprotect(s.stacks + i * slot, page, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
    s.fibers[i].stack = s.stacks + i * slot + page;
  }
}

// Makes fiber f start at FiberEntry on its next switch.
inline void ResetFiber(Fiber* f) {
#if defined(__x86_64__)
  // FiberEntry starts as if called: its (never used) return address at top[0], top = 8 (mod 16).
  uint64_t* top = reinterpret_cast<uint64_t*>(f->stack + kStackBytes) - 3;
  top[0] = top[1] = top[2] = 0;
  uint64_t* sp = top - 8;  // control words, r15, r14, r13, r12, rbx, rbp, the address cuda_emu_switch returns to
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i < 7; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&FiberEntry);
  f->sp = sp;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = f->stack;
  f->ctx.uc_stack.ss_size = kStackBytes;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(&FiberEntry), 0);
#endif
}

// Records the first error of the launch; from a fiber, leaves it for good (its block is abandoned).
inline void Fail(const std::string& message) {
  EmuState& s = State();
  if (s.error.empty()) s.error = message;
  s.aborted = true;
  if (s.current != nullptr) {
    Fiber* f = s.current;
    SwitchToScheduler(f);
    std::fprintf(stderr, "cuda_emu: an aborted fiber was resumed\n");
    std::abort();
  }
}

inline std::string Where(const Fiber* f) {
  const EmuState& s = State();
  char buf[160];
  std::snprintf(buf, sizeof(buf), "block (%u, %u, %u) thread %d (warp %d lane %d)", s.block_idx.x, s.block_idx.y,
                s.block_idx.z, f->linear, f->linear / kWarpSize, f->linear % kWarpSize);
  return buf;
}

[[noreturn]] inline void FiberEntry() {
  EmuState& s = State();
  s.body(s.body_arg);
  Fiber* f = s.current;
  f->status = Fiber::kDone;
  ++s.done;
  const int warp = f->linear / kWarpSize;
  if (s.warps[warp].arrived > 0) {
    Fail("mismatched warp collective: " + Where(f) + " exited while other lanes of its warp wait at a collective");
  }
  if (s.at_barrier > 0) {
    Fail("divergent __syncthreads: " + Where(f) + " exited while other threads of the block wait at a barrier");
  }
  SwitchToScheduler(f);
  std::fprintf(stderr, "cuda_emu: a finished fiber was resumed\n");
  std::abort();
}

// ---------------------------------------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------------------------------------

inline uint64_t NextRandom(uint64_t& x) {  // xorshift64*
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  return x * 0x2545F4914F6CDD1DULL;
}

inline void Shuffle(int* v, int n, uint64_t& rng) {
  for (int i = n - 1; i > 0; --i) std::swap(v[i], v[NextRandom(rng) % (i + 1)]);
}

inline std::string DeadlockReport() {
  EmuState& s = State();
  int at_warp = 0;
  for (int i = 0; i < s.threads; ++i) at_warp += s.fibers[i].status == Fiber::kAtWarp;
  char buf[200];
  std::snprintf(buf, sizeof(buf),
                "deadlock in block (%u, %u, %u): %d threads at a barrier, %d at warp collectives, %d done of %d "
                "(a barrier or collective that not every thread reaches)",
                s.block_idx.x, s.block_idx.y, s.block_idx.z, s.at_barrier, at_warp, s.done, s.threads);
  return buf;
}

// Runs one block to its end (or to the launch's first error).
inline void RunBlock(uint64_t& rng) {
  EmuState& s = State();
  for (const Extent& e : s.shared) std::memset(reinterpret_cast<void*>(e.begin), 0xff, e.end - e.begin);
  for (int i = 0; i < s.threads; ++i) {
    Fiber* f = &s.fibers[i];
    f->linear = i;
    f->thread_idx = {i % s.block_dim.x, (i / s.block_dim.x) % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y)};
    f->status = Fiber::kReady;
    ResetFiber(f);
  }
  for (int w = 0; w < (s.threads + kWarpSize - 1) / kWarpSize; ++w) s.warps[w].arrived = 0;
  s.done = 0;
  s.at_barrier = 0;
  const int warps = (s.threads + kWarpSize - 1) / kWarpSize;
  int warp_order[kMaxThreads / kWarpSize], lane_order[kWarpSize];
  for (int w = 0; w < warps; ++w) warp_order[w] = w;
  for (int l = 0; l < kWarpSize; ++l) lane_order[l] = l;
  while (s.done < s.threads && !s.aborted) {
    bool ran = false;
    if (s.schedule == 0) {  // lockstep: every ready fiber once per round, in thread order
      for (int i = 0; i < s.threads && !s.aborted; ++i) {
        Fiber* f = &s.fibers[i];
        if (f->status != Fiber::kReady) continue;
        ran = true;
        SwitchToFiber(f);
      }
    } else {  // warp-serial: one warp at a time up to its next barrier, warps and lanes in a fresh order each time
      Shuffle(warp_order, warps, rng);
      for (int k = 0; k < warps && !s.aborted; ++k) {
        const int w = warp_order[k];
        const int lanes = std::min(kWarpSize, s.threads - w * kWarpSize);
        for (bool progress = true; progress && !s.aborted;) {
          progress = false;
          Shuffle(lane_order, kWarpSize, rng);
          for (int l = 0; l < kWarpSize && !s.aborted; ++l) {
            if (lane_order[l] >= lanes) continue;
            Fiber* f = &s.fibers[w * kWarpSize + lane_order[l]];
            if (f->status != Fiber::kReady) continue;
            ran = progress = true;
            SwitchToFiber(f);
          }
        }
      }
    }
    if (!ran && !s.aborted) Fail(DeadlockReport());
  }
}

inline std::string KernelName(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
  std::free(demangled);
  if (name.rfind("void ", 0) == 0) name = name.substr(5);
  const size_t paren = name.find('(');
  return paren == std::string::npos ? name : name.substr(0, paren);
}

template <typename A>
int64_t ArgValue(const A& a) {
  if constexpr (std::is_pointer_v<A>) {
    return static_cast<int64_t>(reinterpret_cast<uintptr_t>(a));
  } else {
    return static_cast<int64_t>(a);
  }
}

template <typename... P>
struct KernelCall {
  void (*kernel)(P...);
  std::tuple<P...> args;
  static void Invoke(void* self) {
    KernelCall* c = static_cast<KernelCall*>(self);
    std::apply(c->kernel, c->args);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Collectives
// ---------------------------------------------------------------------------------------------------------

inline const char* OpName(Op op) {
  switch (op) {
    case Op::kShflIdx: return "shfl.sync.idx";
    case Op::kShflXor: return "shfl.sync.bfly";
    case Op::kMmaF16: return "mma.sync.m16n8k16.f32.f16";
    case Op::kMmaBF16: return "mma.sync.m16n8k16.f32.bf16";
    case Op::kLdmatrixX4: return "ldmatrix.sync.x4";
  }
  return "?";
}

inline bool InExtents(const std::vector<Extent>& extents, uintptr_t p, size_t bytes) {
  for (const Extent& e : extents) {
    if (p >= e.begin && p + bytes <= e.end) return true;
  }
  return false;
}

inline float Bf16ToFloat(uint32_t bits) {
  const uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float F16ToFloat(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(static_cast<float>(man), -24);  // zero and subnormals, exact
  } else if (exp == 31) {
    mag = man == 0 ? INFINITY : NAN;
  } else {
    mag = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// mma.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C for the warp. The element of each (lane, value) is given by the
// CUTLASS SM80_16x8x16 layouts: lane t = t0 + 4 t1, value v = v0 + 2 v1 (+ 4 v2); A (16 x 16, index m + 16 k):
// 32 t0 + t1 + 16 v0 + 8 v1 + 128 v2; B (8 x 16, index n + 8 k): 16 t0 + t1 + 8 v0 + 64 v1; C / D (16 x 8, index
// m + 16 n): 32 t0 + t1 + 16 v0 + 8 v1. Value v of a 16-bit operand is half v % 2 (low half first) of register v / 2.
inline void Mma(WarpState& w, bool bf16) {
  double a[16][16], b[16][8], c[16][8];
  for (int t = 0; t < kWarpSize; ++t) {
    const int t0 = t % 4, t1 = t / 4;
    const LanePayload& p = w.lanes[t];
    for (int v = 0; v < 8; ++v) {
      const int idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * ((v >> 1) & 1) + 128 * (v >> 2);
      const uint32_t bits = (p.in[v / 2] >> (16 * (v % 2))) & 0xffffu;
      a[idx % 16][idx / 16] = bf16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
    }
    for (int v = 0; v < 4; ++v) {
      const int idx = 16 * t0 + t1 + 8 * (v & 1) + 64 * (v >> 1);
      const uint32_t bits = (p.in[4 + v / 2] >> (16 * (v % 2))) & 0xffffu;
      b[idx / 8][idx % 8] = bf16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
    }
    for (int v = 0; v < 4; ++v) {
      const int idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * (v >> 1);
      float f;
      std::memcpy(&f, &p.in[6 + v], 4);
      c[idx % 16][idx / 16] = f;
    }
  }
  for (int t = 0; t < kWarpSize; ++t) {
    const int t0 = t % 4, t1 = t / 4;
    for (int v = 0; v < 4; ++v) {
      const int idx = 32 * t0 + t1 + 16 * (v & 1) + 8 * (v >> 1);
      const int m = idx % 16, n = idx / 16;
      double sum = c[m][n];
      for (int k = 0; k < 16; ++k) sum += a[m][k] * b[k][n];
      const float f = static_cast<float>(sum);
      std::memcpy(&w.lanes[t].out[v], &f, 4);
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 as the SM75_U32x4_LDSM_N copy traits state it, in bits: the source is
// 32 rows of 128 bits, row r addressed by lane r; bit b of destination register v of lane t is bit
// 32 t + b + 1024 v of that sequence.
inline void Ldmatrix(WarpState& w) {
  for (int t = 0; t < kWarpSize; ++t) {
    for (int v = 0; v < 4; ++v) {
      const int bit = 32 * t + 1024 * v;
      const char* row = static_cast<const char*>(w.lanes[bit / 128].ptr);
      std::memcpy(&w.lanes[t].out[v], row + (bit % 128) / 8, 4);
    }
  }
}

inline void Complete(WarpState& w) {
  EmuState& s = State();
  ++s.collectives;
  switch (w.op) {
    case Op::kShflIdx:
      for (int t = 0; t < kWarpSize; ++t) w.lanes[t].out[0] = w.lanes[w.lanes[t].in[1] & 31].in[0];
      break;
    case Op::kShflXor:
      for (int t = 0; t < kWarpSize; ++t) w.lanes[t].out[0] = w.lanes[(t ^ w.lanes[t].in[1]) & 31].in[0];
      break;
    case Op::kMmaF16: Mma(w, false); break;
    case Op::kMmaBF16: Mma(w, true); break;
    case Op::kLdmatrixX4: Ldmatrix(w); break;
  }
}

// Lane payload p arrives at collective op of call site `site`; returns when the warp's collective is complete.
inline void Collective(Op op, uint32_t mask, const void* site, LanePayload& p) {
  EmuState& s = State();
  Fiber* f = CurrentThread();
  const int lane = f->linear % kWarpSize;
  if (mask != 0xffffffffu) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), " with mask 0x%08x", mask);
    Fail(std::string("partial warp mask: ") + OpName(op) + buf + " at " + Where(f) +
         " (the kernels use full-warp collectives only)");
  }
  WarpState& w = s.warps[f->linear / kWarpSize];
  if (w.arrived == 0) {
    w.op = op;
    w.site = site;
    for (int i = 0; i < kWarpSize; ++i) {
      if (s.fibers[f->linear - lane + i].status == Fiber::kDone) {
        Fail(std::string("mismatched warp collective: ") + Where(f) + " reached " + OpName(op) + " after lane " +
             std::to_string(i) + " of its warp exited");
      }
    }
  } else if (w.op != op || w.site != site) {
    Fail(std::string("mismatched warp collective: ") + Where(f) + " reached " + OpName(op) +
         " while its warp waits at " + OpName(w.op) + " of another call site");
  }
  w.lanes[lane] = p;
  f->status = Fiber::kAtWarp;
  if (++w.arrived == kWarpSize) {
    Complete(w);
    w.arrived = 0;
    for (int i = 0; i < kWarpSize; ++i) s.fibers[f->linear - lane + i].status = Fiber::kReady;
  }
  SwitchToScheduler(f);
  p = w.lanes[lane];
}

// ---------------------------------------------------------------------------------------------------------
// Conversions (round to nearest even)
// ---------------------------------------------------------------------------------------------------------

inline uint16_t FloatToF16(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fff;                                     // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);     // >= 65520 rounds to infinity
  if (ax < 0x38800000u) {                                                  // below 2^-14: subnormal f16 (or zero)
    const double scaled = std::fabs(static_cast<double>(v)) * 16777216.0;  // units of 2^-24, exact
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  const uint32_t rounded = ax + 0xfffu + ((ax >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)));
}

inline uint16_t FloatToBf16(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------------------------------------------------
// Global memory checks
// ---------------------------------------------------------------------------------------------------------

inline void CheckGlobal(const void* p, size_t bytes, size_t align, const char* what) {
  EmuState& s = State();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  char buf[200];
  if (a % align != 0) {
    std::snprintf(buf, sizeof(buf), "%s at %p is not %zu-byte aligned, at ", what, p, align);
    Fail(buf + Where(CurrentThread()));
  }
  if (!InExtents(s.buffers, a, bytes)) {
    std::snprintf(buf, sizeof(buf), "%s of %zu bytes at %p lies outside every buffer of the launch, at ", what, bytes,
                  p);
    Fail(buf + Where(CurrentThread()));
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------
// Host side: configuration and launch
// ---------------------------------------------------------------------------------------------------------

inline void Reset() {
  detail::EmuState& s = detail::State();
  s.buffers.clear();
  s.launches.clear();
  s.error.clear();
  s.collectives = s.switches = 0;
}

// Runs kernel(args...) on grid x block now (the stream is ignored: everything is synchronous). Errors are kept for
// cudaGetLastError; after one, later launches only record themselves until it is read.
template <typename... P, typename... A>
void Launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  detail::EmuState& s = detail::State();
  LaunchRecord record{detail::KernelName(reinterpret_cast<const void*>(kernel)), grid, block, {}};
  detail::KernelCall<P...> call{kernel, std::tuple<P...>(std::forward<A>(args)...)};
  std::apply([&](const auto&... a) { (record.args.push_back(detail::ArgValue(a)), ...); }, call.args);
  s.launches.push_back(record);
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    if (s.error.empty()) s.error = "invalid launch configuration";
    return;
  }
  if (s.dry_run || !s.error.empty()) return;
  detail::MapStacks(s);
  s.block_dim = block;
  s.grid_dim = grid;
  s.threads = static_cast<int>(threads);
  s.body = &detail::KernelCall<P...>::Invoke;
  s.body_arg = &call;
  s.aborted = false;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  uint64_t rng = 0x9E3779B97F4A7C15ULL;
  for (uint64_t i = 0; i < blocks && !s.aborted; ++i) {
    const uint64_t b = s.schedule != 0 ? blocks - 1 - i : i;
    s.block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    detail::RunBlock(rng);
  }
}

// Calls a kernel through Launch: LaunchExpr(kernel, grid, block, stream)(args...).
template <typename K>
struct LaunchExpr {
  K kernel;
  dim3 grid, block;
  cudaStream_t stream;
  template <typename... A>
  void operator()(A&&... args) const {
    Launch(kernel, grid, block, stream, std::forward<A>(args)...);
  }
};
template <typename K>
LaunchExpr<K> MakeLaunch(K kernel, dim3 grid, dim3 block, cudaStream_t stream) {
  return {kernel, grid, block, stream};
}

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  cuda_emu::detail::EmuState& s = cuda_emu::detail::State();
  if (s.error.empty()) return cudaSuccess;
  s.taken_error = "cuda_emu: " + s.error;
  s.error.clear();
  return cudaErrorLaunchFailure;
}
// The emulator's errors carry their own text: that of the error cudaGetLastError returned last.
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : cuda_emu::detail::State().taken_error.c_str();
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? cuda_emu::detail::State().sm_count : 0;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------
// Device functions the kernels call
// ---------------------------------------------------------------------------------------------------------

__attribute__((noinline)) inline void __syncthreads() {
  using namespace cuda_emu::detail;
  EmuState& s = State();
  Fiber* f = CurrentThread();
  const void* site = __builtin_return_address(0);
  if (s.done > 0) {
    Fail("divergent __syncthreads: " + Where(f) + " reached a barrier after " + std::to_string(s.done) +
         " threads of its block exited");
  }
  if (s.at_barrier == 0) {
    s.barrier_site = site;
  } else if (site != s.barrier_site) {
    Fail("divergent __syncthreads: " + Where(f) + " reached another __syncthreads than the threads waiting");
  }
  f->status = Fiber::kAtBarrier;
  if (++s.at_barrier == s.threads - s.done) {
    for (int i = 0; i < s.threads; ++i) {
      if (s.fibers[i].status == Fiber::kAtBarrier) s.fibers[i].status = Fiber::kReady;
    }
    s.at_barrier = 0;
  }
  SwitchToScheduler(f);
}

template <typename V>
__attribute__((noinline)) V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  if (width != 32) cuda_emu::detail::Fail("__shfl_sync: width other than 32");
  cuda_emu::detail::LanePayload p;
  std::memcpy(&p.in[0], &v, 4);
  p.in[1] = static_cast<uint32_t>(src_lane);
  cuda_emu::detail::Collective(cuda_emu::detail::Op::kShflIdx, mask, __builtin_return_address(0), p);
  std::memcpy(&v, &p.out[0], 4);
  return v;
}

template <typename V>
__attribute__((noinline)) V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  if (width != 32) cuda_emu::detail::Fail("__shfl_xor_sync: width other than 32");
  cuda_emu::detail::LanePayload p;
  std::memcpy(&p.in[0], &v, 4);
  p.in[1] = static_cast<uint32_t>(lane_mask);
  cuda_emu::detail::Collective(cuda_emu::detail::Op::kShflXor, mask, __builtin_return_address(0), p);
  std::memcpy(&v, &p.out[0], 4);
  return v;
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8-byte value y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = static_cast<uint64_t>(x) | (static_cast<uint64_t>(y) << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}

template <typename V>
inline V __ldg(const V* p) {
  cuda_emu::detail::CheckGlobal(p, sizeof(V), sizeof(V), "__ldg");
  return *p;
}

// Shared-window addresses: only ldmatrix takes them, and its emulation takes the generic pointer instead.
inline size_t __cvta_generic_to_shared(const void* p) {
  cuda_emu::detail::Fail("__cvta_generic_to_shared is not emulated (the emulated ldmatrix takes generic pointers)");
  return reinterpret_cast<size_t>(p);
}

// ---------------------------------------------------------------------------------------------------------
// The inline PTX of matmul_nf4.cu
// ---------------------------------------------------------------------------------------------------------

namespace cuda_emu {
namespace ptx {

inline float cvt_f32_f16(uint16_t h) { return detail::F16ToFloat(h); }       // cvt.f32.f16
inline uint16_t cvt_rn_f16_f32(float v) { return detail::FloatToF16(v); }    // cvt.rn.f16.f32
inline uint16_t cvt_rn_bf16_f32(float v) { return detail::FloatToBf16(v); }  // cvt.rn.bf16.f32

// ld.global.nc[.L1::no_allocate].v{2,4}.u32
inline void ld_global_nc_v4(const void* p, uint32_t (&q)[4]) {
  detail::CheckGlobal(p, 16, 16, "ld.global.nc.v4.u32");
  std::memcpy(q, p, 16);
}
inline void ld_global_nc_v2(const void* p, uint32_t& a, uint32_t& b) {
  detail::CheckGlobal(p, 8, 8, "ld.global.nc.v2.u32");
  std::memcpy(&a, p, 4);
  std::memcpy(&b, static_cast<const char*>(p) + 4, 4);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with C = D.
__attribute__((noinline)) inline void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                   uint32_t b1) {
  detail::LanePayload p;
  for (int i = 0; i < 4; ++i) p.in[i] = a[i];
  p.in[4] = b0;
  p.in[5] = b1;
  std::memcpy(&p.in[6], d, 16);
  detail::Collective(bf16 ? detail::Op::kMmaBF16 : detail::Op::kMmaF16, 0xffffffffu, __builtin_return_address(0), p);
  std::memcpy(d, p.out, 16);
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 with the lane's row address as a generic pointer.
__attribute__((noinline)) inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  detail::EmuState& s = detail::State();
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  if (a % 16 != 0 || !detail::InExtents(s.shared, a, 16)) {
    char buf[120];
    std::snprintf(buf, sizeof(buf), "ldmatrix row address %p is not 16 aligned bytes of shared memory, at ", row);
    detail::Fail(buf + detail::Where(detail::CurrentThread()));
  }
  detail::LanePayload p;
  p.ptr = row;
  detail::Collective(detail::Op::kLdmatrixX4, 0xffffffffu, __builtin_return_address(0), p);
  std::memcpy(r, p.out, 16);
}

}  // namespace ptx
}  // namespace cuda_emu

#endif  // ONNX_NF4_CUDA_EMU_H_
