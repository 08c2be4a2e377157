// A small CPU emulator of the CUDA features the kernels in head_kernels.cuh use, so that the
// kernels (and the host launch logic of head_device_ops.h) run unchanged on machines without
// a GPU.  It is a test tool, not a backend: it is slow and single-threaded.
//
// * Every CUDA thread of a block is a cooperative coroutine (ucontext) with its own stack;
//   blocks run one after another.  __syncthreads() and __syncwarp() are real barriers: a
//   thread parks until every live thread of its block (warp) arrives.  Threads parked at
//   different barriers, or a barrier reached after other threads exited, raise an error
//   (these are hangs or undefined behaviour on a GPU).
// * Dynamic shared memory is poisoned with 0xFF bytes (NaN in every float type) before each
//   block, so reading an element that was never written shows up as NaN, and a guard zone
//   after it is checked for overruns.
// * WMMA fragments hold the whole 16x16 tile in every lane; load/mma are computed per lane
//   (fp32 accumulation), store is done by lane 0 (the kernels __syncwarp() after a store, as
//   real WMMA requires).  Pointer alignment (256 bit) and ldm rules are checked.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sk_emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  State state = kRunnable;
  char* stack = nullptr;
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Thread> threads;
  unsigned char* smem = nullptr;
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline Block*& current_block() {
  static Block* b = nullptr;
  return b;
}
inline Thread*& current_thread() {
  static Thread* t = nullptr;
  return t;
}
inline unsigned char* dynamic_smem() { return current_block()->smem; }

inline void park(State s) {
  Thread* t = current_thread();
  t->state = s;
  swapcontext(&t->ctx, &current_block()->sched);
}
inline void syncthreads() { park(kAtBlockBarrier); }
inline void syncwarp() { park(kAtWarpBarrier); }

inline void thread_entry() {
  Block* b = current_block();
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  current_thread()->state = kDone;  // returns to b->sched through uc_link
}

// Runs body() as a grid of blocks of threads, with smem_bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  const int nthreads = (int)(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || nthreads % 32 != 0)
    throw std::runtime_error("sk_emu: block size must be a multiple of 32 up to 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("sk_emu: invalid grid size");
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.body = &body;
  b.threads.resize(nthreads);
  std::vector<std::unique_ptr<char[]>> stacks;
  for (auto& t : b.threads) {
    stacks.emplace_back(new char[kStackBytes]);
    t.stack = stacks.back().get();
  }
  const size_t smem_alloc = ((smem_bytes + kGuardBytes + 127) / 128) * 128;
  std::unique_ptr<unsigned char, decltype(&std::free)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, smem_alloc)), &std::free);
  b.smem = smem.get();
  Block* saved_block = current_block();
  Thread* saved_thread = current_thread();
  current_block() = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.bid = dim3(bx, by, bz);
        std::memset(b.smem, 0xFF, smem_alloc);
        for (int i = 0; i < nthreads; ++i) {
          Thread& t = b.threads[i];
          t.linear = i;
          t.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          t.state = kRunnable;
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack;
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = &b.sched;
          makecontext(&t.ctx, (void (*)())thread_entry, 0);
        }
        for (;;) {
          for (auto& t : b.threads) {
            if (t.state != kRunnable) continue;
            current_thread() = &t;
            swapcontext(&b.sched, &t.ctx);
          }
          if (!b.error.empty()) break;
          int done = 0, at_block = 0;
          for (auto& t : b.threads) {
            done += t.state == kDone;
            at_block += t.state == kAtBlockBarrier;
          }
          if (done == nthreads) break;
          bool released = false;
          for (int w = 0; w < nthreads / 32; ++w) {  // __syncwarp: all live lanes arrived
            int live = 0, waiting = 0;
            for (int l = 0; l < 32; ++l) {
              const State s = b.threads[w * 32 + l].state;
              live += s != kDone;
              waiting += s == kAtWarpBarrier;
            }
            if (live > 0 && waiting == live) {
              for (int l = 0; l < 32; ++l) b.threads[w * 32 + l].state = kRunnable;
              released = true;
            }
          }
          if (!released && at_block == nthreads) {  // __syncthreads: everybody arrived
            for (auto& t : b.threads) t.state = kRunnable;
            released = true;
          }
          if (!released) {
            b.error = "sk_emu: barrier mismatch in block (" + std::to_string(bx) + "," +
                      std::to_string(by) + "): " + std::to_string(at_block) + " threads at " +
                      "__syncthreads, " + std::to_string(done) + " exited, the rest at __syncwarp";
            break;
          }
        }
        for (size_t i = smem_bytes; i < smem_bytes + kGuardBytes; ++i)
          if (b.smem[i] != 0xFF && b.error.empty())
            b.error = "sk_emu: write past the end of dynamic shared memory (" +
                      std::to_string(smem_bytes) + " bytes) at offset " + std::to_string(i);
        if (!b.error.empty()) {
          current_block() = saved_block;
          current_thread() = saved_thread;
          throw std::runtime_error(b.error);
        }
      }
  current_block() = saved_block;
  current_thread() = saved_thread;
}

inline int lane() { return current_thread()->linear % 32; }

// ---- WMMA ---------------------------------------------------------------------------------
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

// The whole 16x16 tile, logical row-major: A (m, k), B (k, n), C (m, n).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "sk_emu: only 16x16x16 WMMA");
  float v[256];
};

inline void check_ptr(const void* p, unsigned ldm, unsigned multiple) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error("sk_emu: WMMA pointer not 256-bit aligned");
  if (ldm % multiple != 0) throw std::runtime_error("sk_emu: WMMA ldm not a multiple of 16 bytes");
}

template <class Use, class T, class L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (float& e : f.v) e = x;
}
template <class T, class L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, 16 / sizeof(T));
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      f.v[m * 16 + k] = static_cast<float>(std::is_same_v<L, row_major> ? p[m * ldm + k]
                                                                         : p[k * ldm + m]);
}
template <class T, class L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, 16 / sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n)
      f.v[k * 16 + n] = static_cast<float>(std::is_same_v<L, row_major> ? p[k * ldm + n]
                                                                         : p[n * ldm + k]);
}
template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += a.v[m * 16 + k] * b.v[k * 16 + n];
      out[m * 16 + n] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, 4);
  if (lane() != 0) return;  // one lane writes the tile; the others see it after __syncwarp
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n)
      p[layout == mem_row_major ? m * ldm + n : n * ldm + m] = f.v[m * 16 + n];
}
}  // namespace wmma
}  // namespace sk_emu

// ---- the CUDA names the kernels use ---------------------------------------------------------
inline void __syncthreads() { sk_emu::syncthreads(); }
#define threadIdx (::sk_emu::current_thread()->tid)
#define blockIdx (::sk_emu::current_block()->bid)
#define blockDim (::sk_emu::current_block()->bdim)
#define gridDim (::sk_emu::current_block()->gdim)
#define __restrict__

#define SK_DEV inline
#define SK_GLOBAL
#define SK_LAUNCH_BOUNDS(n)
#define SK_GRID_CONSTANT
#define SK_DYNAMIC_SMEM(name) unsigned char* name = ::sk_emu::dynamic_smem()
#define SK_SYNCWARP() ::sk_emu::syncwarp()
#define SK_LAUNCH(kfn, grid, block, smem, stream, ...) \
  ((void)(stream), ::sk_emu::launch((grid), (block), (smem), [=]() { kfn(__VA_ARGS__); }))

namespace spinalkern {
using dev_half = c10::Half;
using dev_bf16 = c10::BFloat16;
namespace wmma = ::sk_emu::wmma;
using sk_stream_t = int;
inline int min(int a, int b) { return a < b ? a : b; }
}  // namespace spinalkern
