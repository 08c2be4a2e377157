// A small CPU emulator of the CUDA features the kernels use (csrc/head_*_kernel*.cuh), so that
// the kernels and their host launch code (csrc/head_launch.h) run unchanged on machines
// without a GPU.  It is a test tool, not a backend: it is slow and single-threaded.
//
// * Every CUDA thread of a block is a cooperative coroutine (ucontext) with its own stack;
//   blocks run one after another.  __syncthreads() is a real barrier: a thread parks until
//   every thread of its block arrives; a barrier reached after other threads exited raises
//   an error (a hang or undefined behaviour on a GPU).  Scheduling is greedy per warp: one
//   warp runs until all its lanes wait at __syncthreads, then the next, in alternating order
//   from one barrier to the next, so that a warp reads shared memory before other warps have
//   written it (or landed their copies) unless a barrier orders them.
// * Dynamic shared memory is poisoned with 0xFF bytes (NaN in every float type) before each
//   block, so reading an element that was never written shows up as NaN, and a guard zone
//   after it is checked for overruns.
// * cp.async (cp_async16 / cp_async_commit / cp_async_wait<N>) is modelled as on the GPU:
//   issuing a copy checks its alignment and address spaces, reads the source and poisons the
//   16 destination bytes; the data (zero-filled past src_bytes) lands only when the issuing
//   thread waits for the copy's commit group.  A copy read before its wait, or by another
//   thread before the barrier that follows the wait, therefore reads NaN.  A thread that exits
//   with copies never waited for is an error.
// * ldmatrix and mma.sync are warp collectives: each lane deposits its operand (an address,
//   or fragment registers) and parks; when all 32 lanes have arrived at the same collective,
//   each computes its result from everyone's operands with the fragment layouts of the PTX
//   ISA.  A collective reached by only part of a warp (divergence, or exited lanes) is an
//   error.  mma accumulates in fp32 (exact products, sequential sums).
// * Fault injection (set_fault): "cp_async_wait_early" makes cp_async_wait<N> return with one
//   more group in flight than asked; "skip_syncthreads" turns __syncthreads into a no-op.
//   Tests use them to show that the emulator catches exactly these bugs.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
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
enum State { kRunnable, kAtBlockBarrier, kAtCollective, kDone };

enum Fault { kNoFault = 0, kWaitEarly = 1, kSkipSyncthreads = 2 };
inline int& fault() {
  static int f = kNoFault;
  return f;
}
inline void set_fault(const std::string& name) {
  if (name.empty() || name == "none") fault() = kNoFault;
  else if (name == "cp_async_wait_early") fault() = kWaitEarly;
  else if (name == "skip_syncthreads") fault() = kSkipSyncthreads;
  else throw std::invalid_argument("sk_emu: unknown fault " + name);
}

struct PendingCopy {
  unsigned char* dst;
  unsigned char data[16];
};

// What a lane deposits for a warp collective.
struct LaneSlot {
  int op = 0;              // which collective (checked to be the same in all lanes)
  const void* addr = nullptr;
  uint32_t regs[6] = {0, 0, 0, 0, 0, 0};
};
struct WarpSlots {
  LaneSlot slot[2][32];    // double-buffered by the lanes' collective counters
};

struct Thread {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  State state = kRunnable;
  char* stack = nullptr;
  unsigned collectives = 0;
  std::vector<PendingCopy> open;                 // copies of the group not yet committed
  std::deque<std::vector<PendingCopy>> groups;   // committed groups, oldest first
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Thread> threads;
  std::vector<WarpSlots> warps;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
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

inline void fail(const std::string& msg) { throw std::runtime_error("sk_emu: " + msg); }

inline void park(State s) {
  Thread* t = current_thread();
  t->state = s;
  swapcontext(&t->ctx, &current_block()->sched);
}
inline void syncthreads() {
  if (fault() == kSkipSyncthreads) return;
  park(kAtBlockBarrier);
}

inline bool in_smem(const void* p, size_t bytes) {
  const Block* b = current_block();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= b->smem && c + bytes <= b->smem + b->smem_bytes;
}

// ---- cp.async ------------------------------------------------------------------------------
inline void land(std::vector<PendingCopy>& group) {
  for (auto& c : group) std::memcpy(c.dst, c.data, 16);
  group.clear();
}

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (!in_smem(dst, 16)) fail("cp.async destination outside dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp.async destination not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src_bytes outside [0, 16]");
  PendingCopy c;
  c.dst = static_cast<unsigned char*>(dst);
  std::memset(c.data, 0, 16);
  if (src_bytes > 0) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
    if (in_smem(src, 1)) fail("cp.async source in shared memory");
    std::memcpy(c.data, src, src_bytes);
  }
  std::memset(c.dst, 0xFF, 16);  // until the copy lands, the destination reads as NaN
  current_thread()->open.push_back(c);
}
inline void cp_async_commit() {
  Thread* t = current_thread();
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}
inline void cp_async_wait(int n) {
  Thread* t = current_thread();
  if (fault() == kWaitEarly) ++n;
  while ((int)t->groups.size() > n) {
    land(t->groups.front());
    t->groups.pop_front();
  }
}

// ---- warp collectives ----------------------------------------------------------------------
inline LaneSlot* warp_slots() {  // this collective's 32 slots, after the rendezvous
  Thread* t = current_thread();
  return current_block()->warps[t->linear / 32].slot[t->collectives & 1];
}
inline LaneSlot* collective(int op, const void* addr, const uint32_t* regs, int nregs) {
  Thread* t = current_thread();
  LaneSlot& s = current_block()->warps[t->linear / 32].slot[t->collectives & 1][t->linear % 32];
  s.op = op;
  s.addr = addr;
  for (int i = 0; i < nregs; ++i) s.regs[i] = regs[i];
  park(kAtCollective);  // released when all 32 lanes of the warp are here
  LaneSlot* all = warp_slots();
  for (int l = 0; l < 32; ++l)
    if (all[l].op != op) fail("warp lanes at different collectives (divergent ldmatrix/mma)");
  ++t->collectives;
  return all;
}

enum { kOpLdsm = 1, kOpMmaF16 = 16, kOpMmaBF16 = 17 };

template <int NMAT, bool TRANS>
inline void ldmatrix(uint32_t* r, const void* p) {
  if (!in_smem(p, 16)) fail("ldmatrix address outside dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  const LaneSlot* all = collective(kOpLdsm + NMAT * 2 + TRANS, p, nullptr, 0);
  const int l = current_thread()->linear % 32, g = l / 4, t = l % 4;
  for (int q = 0; q < NMAT; ++q) {
    uint16_t lo, hi;
    if (!TRANS) {
      const auto* row = static_cast<const uint16_t*>(all[8 * q + g].addr);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(all[8 * q + 2 * t].addr)[g];
      hi = static_cast<const uint16_t*>(all[8 * q + 2 * t + 1].addr)[g];
    }
    r[q] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
}

template <typename T16>
inline float b16_to_float(uint16_t bits) {
  T16 v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

template <typename T16>
inline void mma16816(float* d, const uint32_t* a, const uint32_t* b) {
  static_assert(std::is_same_v<T16, c10::Half> || std::is_same_v<T16, c10::BFloat16>);
  uint32_t regs[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const LaneSlot* all =
      collective(std::is_same_v<T16, c10::Half> ? kOpMmaF16 : kOpMmaBF16, nullptr, regs, 6);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {  // fragment layouts of mma.m16n8k16 (PTX ISA)
    const int g = l / 4, t = l % 4;
    const uint32_t* rg = all[l].regs;
    auto put = [&](float (*M)[16], int row, int col, uint32_t w) {
      M[row][col] = b16_to_float<T16>((uint16_t)(w & 0xFFFF));
      M[row][col + 1] = b16_to_float<T16>((uint16_t)(w >> 16));
    };
    put(A, g, 2 * t, rg[0]);
    put(A, g + 8, 2 * t, rg[1]);
    put(A, g, 2 * t + 8, rg[2]);
    put(A, g + 8, 2 * t + 8, rg[3]);
    B[2 * t][g] = b16_to_float<T16>((uint16_t)(rg[4] & 0xFFFF));
    B[2 * t + 1][g] = b16_to_float<T16>((uint16_t)(rg[4] >> 16));
    B[2 * t + 8][g] = b16_to_float<T16>((uint16_t)(rg[5] & 0xFFFF));
    B[2 * t + 9][g] = b16_to_float<T16>((uint16_t)(rg[5] >> 16));
  }
  const int l = current_thread()->linear % 32, g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[e] = s;
  }
}

// ---- the scheduler -------------------------------------------------------------------------
inline void thread_entry() {
  Block* b = current_block();
  try {
    (*b->body)();
    Thread* t = current_thread();
    size_t pending = t->open.size();
    for (const auto& g : t->groups) pending += g.size();
    if (pending != 0 && b->error.empty())
      b->error = "sk_emu: thread " + std::to_string(t->linear) + " exited with " +
                 std::to_string(pending) + " cp.async copies never waited for";
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  current_thread()->state = kDone;  // returns to b->sched through uc_link
}

// Runs body() as a grid of blocks of threads, with smem_bytes of dynamic shared memory.
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  const int nthreads = (int)(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024 || nthreads % 32 != 0)
    fail("block size must be a multiple of 32 up to 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("invalid grid size");
  if (smem_bytes > 227 * 1024) fail("more than 227 KB of dynamic shared memory requested");
  Block b;
  b.bdim = block;
  b.gdim = grid;
  b.body = &body;
  b.threads.resize(nthreads);
  b.warps.resize(nthreads / 32);
  b.smem_bytes = smem_bytes;
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
  auto restore = [&] {
    current_block() = saved_block;
    current_thread() = saved_thread;
  };
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
          t.collectives = 0;
          t.open.clear();
          t.groups.clear();
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = t.stack;
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = &b.sched;
          makecontext(&t.ctx, (void (*)())thread_entry, 0);
        }
        const int nwarps = nthreads / 32;
        bool reverse = false;
        for (;;) {
          // Greedy warps: each warp in turn runs until every lane waits at __syncthreads (or
          // exited); a warp collective completes as soon as its 32 lanes arrive.  So a warp
          // runs ahead of the others up to the next barrier, and the order of the warps
          // alternates between rounds.
          for (int k = 0; k < nwarps && b.error.empty(); ++k) {
            const int w = reverse ? nwarps - 1 - k : k;
            for (;;) {
              for (int l = 0; l < 32 && b.error.empty(); ++l) {
                Thread& t = b.threads[w * 32 + l];
                if (t.state != kRunnable) continue;
                current_thread() = &t;
                swapcontext(&b.sched, &t.ctx);
              }
              if (!b.error.empty()) break;
              int at_coll = 0;
              for (int l = 0; l < 32; ++l) at_coll += b.threads[w * 32 + l].state == kAtCollective;
              if (at_coll == 0) break;
              if (at_coll < 32) {
                b.error = "sk_emu: warp " + std::to_string(w) + ": " + std::to_string(at_coll) +
                          " lanes in a warp collective (ldmatrix/mma), the others at a barrier "
                          "or exited";
                break;
              }
              for (int l = 0; l < 32; ++l) b.threads[w * 32 + l].state = kRunnable;
            }
          }
          reverse = !reverse;
          if (!b.error.empty()) break;
          int done = 0, at_block = 0;
          for (auto& t : b.threads) {
            done += t.state == kDone;
            at_block += t.state == kAtBlockBarrier;
          }
          if (done == nthreads) break;
          if (at_block == nthreads) {  // __syncthreads: everybody arrived
            for (auto& t : b.threads) t.state = kRunnable;
            continue;
          }
          b.error = "sk_emu: barrier mismatch in block (" + std::to_string(bx) + "," +
                    std::to_string(by) + "): " + std::to_string(at_block) + " threads at " +
                    "__syncthreads, " + std::to_string(done) + " exited";
          break;
        }
        for (size_t i = smem_bytes; i < smem_bytes + kGuardBytes; ++i)
          if (b.smem[i] != 0xFF && b.error.empty())
            b.error = "sk_emu: write past the end of dynamic shared memory (" +
                      std::to_string(smem_bytes) + " bytes) at offset " + std::to_string(i);
        if (!b.error.empty()) {
          restore();
          throw std::runtime_error(b.error);
        }
      }
  restore();
}
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
#define SK_LAUNCH(kfn, grid, block, smem, stream, ...) \
  ((void)(stream), ::sk_emu::launch((grid), (block), (smem), [=]() { kfn(__VA_ARGS__); }))

namespace spinalkern {
using dev_half = c10::Half;
using dev_bf16 = c10::BFloat16;
using sk_stream_t = int;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  sk_emu::cp_async16(dst, src, src_bytes);
}
inline void cp_async_commit() { sk_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  sk_emu::cp_async_wait(N);
}
inline void ldsm_x4(uint32_t (&r)[4], const void* p) { sk_emu::ldmatrix<4, false>(r, p); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* p) { sk_emu::ldmatrix<4, true>(r, p); }
inline void ldsm_x2(uint32_t (&r)[2], const void* p) { sk_emu::ldmatrix<2, false>(r, p); }
inline void ldsm_x2_trans(uint32_t (&r)[2], const void* p) { sk_emu::ldmatrix<2, true>(r, p); }
template <typename T>
inline void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  sk_emu::mma16816<T>(d, a, b);
}
}  // namespace spinalkern
